"""Heatmaps, attended features, level selection, word and sentence scores (METHOD.md "Scores").

For a text vector ``s`` (a word ``s_t`` or the sentence ``s̄``) and an image's mapped features
``v [N, L, D]``, all L2-normalised:

1. heatmap ``H[n, l] = max(0, <s, v[n, l]>)`` (``heatmap="relu"``, the paper);
2. attended feature ``a[l] = normalise(sum_n H[n, l] v[n, l])``;
3. relevance ``R[l] = <a[l], s>``;
4. level selection ``R* = max_l R[l]``, ``l* = argmax_l R[l]``; for grounding (the heatmap a
   word points with) the level may instead be chosen by its heatmap's focus (``choose_levels``);
5. captions: ``R_w = (1/gamma1) log sum_t exp(gamma1 R*_t)`` over the caption's real words;
6. sentences: ``R_s = R*`` of ``s̄`` (no log-sum-exp).

The reference implementation also summed step 5 over padding positions; that is a bug (a
caption's score then depends on how long the longest caption of its batch is), and here padding
never enters: only the real words (``mask``) are scored at all.

Zero guard: when a heatmap is all zero (no cell has a positive similarity) the attended feature
is 0 and its relevance is 0, with zero gradient — never a NaN. Every normalisation and the
log-sum-exp run in float32 (float64 inputs stay float64), also under autocast.

The softmax ablation (``heatmap="softmax"``). The paper (Sec. 3.2 and the ablation) contrasts its
ReLU heatmap with "applying softmax to attention maps", which "would always force attention to
be a distribution over the image/words summing to 1". Our reading: for each word and level,
``H[:, l] = softmax_n(<s, v[n, l]>)`` — a distribution over the N cells of that level, the
usual soft attention, so ``a[l]`` is a convex combination of the level's cells. Nothing else
changes. Because ``a[l]`` is normalised, the softmax's denominator cancels in every score: the
scores are the same whether the softmax runs over the N cells of each level or over all N·L
cells, and only the returned heatmaps differ (per level they sum to 1). The paper gives no
temperature, so there is none: cosines lie in [-1, 1], and a cell's weight is at most e² ≈ 7.4
times another's — a nearly flat attention, which goes some way to explain the large drop the
paper reports. A softmax over *words* (the other reading of "image/words") is not implemented.

Memory and speed of ``cross_scores`` (every caption against every image). Naively, a batch of
B = 32 captions of T = 15 words against 32 images with N·L = 1296 cells holds 20 M heatmap values
and 63 M floats of attended features (D = 1024), and autograd keeps them for the backward pass.
Here a custom autograd function computes the scores image chunk by image chunk (``chunk`` images
at a time) and keeps only its inputs, each (text, image) pair's chosen level and the scores; the
backward pass recomputes what it needs, chunk by chunk, so the extra memory is bounded by the
chunk whatever the batch size. Two choices make it fast:

- The backward pass is exact and written out by hand (``R = q / r`` with ``q = sum_n H p``,
  ``r = ||sum_n H v||``; see ``_BestLevelScores.backward``), and it only works on the level each
  pair selected: ``max_l`` sends no gradient to the other levels, so recomputing them would be
  wasted. Pairs are grouped by their chosen level into padded blocks (one batched matmul per
  chunk rather than a Python loop over pairs), which cuts the backward cost by about L.
- The attended features are formed directly (``u = H^T v``) inside a chunk rather than through
  the Gram identity ``||u||^2 = H G H^T``. At the paper's sizes the two cost the same in the
  forward pass (``N·D + J·N ≈ J·D`` for J = 480 words, N = 324, D = 1024), but the Gram matrix
  ``G = V V^T`` costs ``N²·D`` per image and level however few words chose that level, so it
  would take back most of the level-sparse backward's saving (and for D < N it is dearer
  everywhere). Memory stays bounded by the chunk either way.

Measured on 2 CPU threads (B = 32 captions of T = 15 real words against 32 images, M = 18,
L = 4, D = 1024, float32, scores + loss + backward): about 1.7 s a step (0.8 s forward, 0.9 s
backward; 3.0 s on one thread), and at most ~25 MB of working tensors on top of the unavoidable
162 MB gradient of ``visual`` — the naive attended tensor alone is 240 MB. At D = 256 the
straightforward autograd formula peaks at 594 MB and runs about 3x slower.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from multigrounding.errors import MultigroundingError, UnknownNameError

LEVEL_CHOICES = ("relevance", "focus")   # how grounding picks a text's level (choose_levels)
HEATMAPS = ("relu", "softmax")
EPS = 1e-12                 # norms at or below this count as zero (as torch's F.normalize)
# Auto chunk: about this many floats per chunk-sized working tensor. On CPU the speed hardly
# depends on the chunk (the matmuls are large either way), so keep memory small; on an
# accelerator fewer, larger chunks save kernel launches and host syncs.
CHUNK_BUDGET = {"cpu": 1 << 21}
CHUNK_BUDGET_DEFAULT = 1 << 24


class HeadsInputError(MultigroundingError, ValueError):
    """A tensor given to the heads or the scores has the wrong shape, dtype or content."""


# ----------------------------------------------------------------------------------- helpers
def compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32 (half and bfloat16 inputs are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64
                                for t in tensors) else torch.float32


def l2_normalize(x: Tensor, dim: int = -1, eps: float = EPS) -> Tensor:
    """``x / ||x||`` over ``dim`` in float32 (float64 stays); a vector of norm <= eps becomes 0.

    Unlike ``F.normalize`` the zero vector gets a zero gradient rather than ``grad / eps``.
    """
    x = x.to(compute_dtype(x))
    squared = (x * x).sum(dim, keepdim=True)
    ok = squared > eps * eps
    return torch.where(ok, x * torch.rsqrt(torch.where(ok, squared, torch.ones_like(squared))),
                       torch.zeros_like(x))


def choose_levels(heat: Tensor, relevance: Tensor, choice: str = "relevance") -> Tensor:
    """The level each heatmap ``H [..., N, L]`` grounds with (``relevance [..., L]``), int64 ``[...]``.

    ``relevance``: ``argmax_l R[l]``, the paper's. ``focus``: ``argmax_l max_n H[n, l]² / Σ_n
    H[n, l]²``, the share of the map's energy in its peak cell — the level that puts its
    attention in one place (issue 16: every level is trained by an auxiliary loss and their
    relevances end up close, so the max is decided by the seed; the focus follows the maps).
    A text whose maps are all zero keeps the relevance's choice.
    """
    if choice not in LEVEL_CHOICES:
        raise UnknownNameError("level choice", str(choice), LEVEL_CHOICES)
    by_relevance = relevance.argmax(dim=-1)
    if choice == "relevance":
        return by_relevance
    energy = heat.float().square()
    total = energy.sum(dim=-2)                                          # [..., L]
    focus = torch.where(total > 0, energy.amax(dim=-2) / total.clamp(min=1e-30),
                        torch.zeros_like(total))
    return torch.where(total.amax(dim=-1) > 0, focus.argmax(dim=-1), by_relevance)


def heatmap_kind(heatmap: str) -> bool:
    """True for the softmax ablation, False for the paper's ReLU; an unknown name is an error."""
    if heatmap not in HEATMAPS:
        raise UnknownNameError("heatmap", str(heatmap), HEATMAPS)
    return heatmap == "softmax"


def _no_autocast(device: torch.device):
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):   # a device type autocast does not know
        return contextlib.nullcontext()


def _describe(x) -> str:
    """A tensor's shape as ``[2, 3]``, anything else by its type."""
    if isinstance(x, Tensor):
        return "[" + ", ".join(str(n) for n in x.shape) + "]"
    return type(x).__name__


def _check_visual(visual: Tensor, dim: int | None = None) -> None:
    if not isinstance(visual, Tensor) or visual.dim() != 4:
        raise HeadsInputError(f"visual must be [B, N, L, D] (GroundingHeads.map_visual's output); "
                              f"got {_describe(visual)}")
    if dim is not None and visual.shape[-1] != dim:
        raise HeadsInputError(f"visual has width D={visual.shape[-1]} but the text vectors have "
                              f"D={dim}; both must come from the same GroundingHeads")


def _check_words(words: Tensor, mask: Tensor | None) -> Tensor:
    """Validate ``words [B, T, D]`` and ``mask [B, T]``; return the mask as bool."""
    if not isinstance(words, Tensor) or words.dim() != 3:
        raise HeadsInputError(f"words must be [B, T, D] (GroundingHeads.map_words' output); got "
                              f"{_describe(words)}")
    if mask is None:
        return torch.ones(words.shape[:2], dtype=torch.bool, device=words.device)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(words.shape[:2]):
        raise HeadsInputError(f"mask must be [B, T] = [{words.shape[0]}, {words.shape[1]}] like "
                              f"words' first two axes; got {_describe(mask)}")
    mask = mask.to(device=words.device, dtype=torch.bool)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise HeadsInputError(f"caption(s) {empty[:10]} of the batch have no real word (mask all "
                              f"False); every caption needs at least one word")
    return mask


def _heat(p: Tensor, softmax: bool, dim: int) -> Tensor:
    """The heatmap from similarities ``p``, cells along ``dim``.

    For softmax, ``exp(p - max)`` without the denominator: the scores are invariant to a positive
    factor per heatmap, so the result (and its gradient) equals the softmax's.
    """
    if softmax:
        return torch.exp(p - p.amax(dim=dim, keepdim=True))
    return torch.relu(p)


# ----------------------------------------------------------------------- the all-pairs scores
def _blocks(visual: Tensor) -> Tensor:
    """``[c, N, L, D]`` → ``[c*L, N, D]``: one block per (image, level), contiguous."""
    c, n, levels, d = visual.shape
    return visual.permute(0, 2, 1, 3).reshape(c * levels, n, d)


def _group_by_level(level: Tensor, levels: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group rows by the level each image chose for them.

    ``level [J, c]`` → ``index [c*L, J_max]`` (row numbers; block ``k`` is image ``k // L`` and
    level ``k % L``), ``valid [c*L, J_max]`` (False on padding, whose index is 0) and ``where
    [c, J]``: the flat position in ``[c*L * J_max]`` of row j for image c.
    """
    rows, images = level.shape
    device = level.device
    key = (level.t() + levels * torch.arange(images, device=device)[:, None]).reshape(-1)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    counts = torch.bincount(key, minlength=images * levels)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(key.numel(), device=device) - starts[sorted_key]
    width = max(int(counts.max().item()), 1)
    index = torch.zeros(images * levels, width, dtype=torch.long, device=device)
    valid = torch.zeros(images * levels, width, dtype=torch.bool, device=device)
    index[sorted_key, rank] = order % rows
    valid[sorted_key, rank] = True
    where = torch.empty_like(key)
    where[order] = sorted_key * width + rank
    return index, valid, where.view(images, rows)


def _ratio(q: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(R, safe r, ok)``: ``R = q / r`` where ``r > EPS``, else 0."""
    ok = r > EPS
    safe = torch.where(ok, r, torch.ones_like(r))
    return torch.where(ok, q / safe, torch.zeros_like(q)), safe, ok


def _attend(vb: Tensor, p: Tensor, softmax: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Blocks ``vb [K, N, D]`` and similarities ``p [K, N, J]`` (consumed) → heatmap ``h``,
    ``q = sum_n h p [K, J]`` and the unnormalised attended features ``u = h^T v [K, J, D]``."""
    if softmax:
        h = torch.exp(p - p.amax(dim=1, keepdim=True))
        q = (h * p).sum(1)
    else:
        h = p.clamp_min_(0)                                 # relu in place: h p = h^2
        q = torch.linalg.vector_norm(h, dim=1).square()
    return h, q, torch.bmm(h.transpose(1, 2), vb)


class _BestLevelScores(torch.autograd.Function):
    """``rows [J, D]`` × ``visual [Bi, N, L, D]`` → best-level relevance ``[J, Bi]`` and its level.

    For every row j and image c: ``R*[j, c] = max_l <normalise(sum_n H v[c, n, l]), s_j>`` with
    ``H = heat(<s_j, v[c, n, l]>)``. Saves only the inputs and the chosen levels; the backward
    pass recomputes per image chunk, for the chosen level only.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, visual: Tensor, softmax: bool, chunk: int):
        with _no_autocast(rows.device):
            count, _ = rows.shape
            images, _, levels, _ = visual.shape
            best = rows.new_empty(count, images)
            level = torch.empty(count, images, dtype=torch.long, device=rows.device)
            for c0 in range(0, images, chunk):
                c1 = min(c0 + chunk, images)
                vb = _blocks(visual[c0:c1])                          # [cL, N, D]
                h, q, u = _attend(vb, torch.matmul(vb, rows.t()), softmax)   # p: [cL, N, J]
                relevance, _, _ = _ratio(q, torch.linalg.vector_norm(u, dim=2))
                value, which = relevance.view(c1 - c0, levels, count).max(dim=1)
                best[:, c0:c1] = value.t()
                level[:, c0:c1] = which.t()
        ctx.softmax, ctx.chunk = softmax, chunk
        ctx.save_for_backward(rows, visual, level)
        ctx.mark_non_differentiable(level)
        return best, level

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_best: Tensor, _grad_level):
        # Per (row s, image, chosen level), with p_n = <s, v_n>, h = heat(p), u = sum_n h_n v_n,
        # q = <u, s> = sum_n h_n p_n, r = ||u||, R = q / r and g = dLoss/dR:
        #   dR/du = w = (s - R u / r) / r,   dR/dh_n = <w, v_n> = (p_n - beta <v_n, u>) / r
        #   with beta = q / r^2;  dR/dp_n = heat'(p_n) dR/dh_n  (heat' = [p > 0], or h_n for exp);
        #   ds   = sum_n coef_n v_n,     dv_n = coef_n s - h_n alpha u,
        #   coef_n = g (h_n / r + dR/dp_n),   alpha = g R / r^2.
        # For relu (h = [p > 0] p): coef_n = (g / r) [p_n > 0] (2 p_n - beta <v_n, u>);
        # for exp:                  coef_n = (g / r) h_n (1 + p_n - beta <v_n, u>).
        rows, visual, level = ctx.saved_tensors
        softmax, chunk = ctx.softmax, ctx.chunk
        need_rows, need_visual = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_visual = torch.zeros_like(visual) if need_visual else None
        with _no_autocast(rows.device):
            grad_best = grad_best.to(rows.dtype)
            images, n, levels, d = visual.shape
            for c0 in range(0, images, chunk):
                c1 = min(c0 + chunk, images)
                index, valid, where = _group_by_level(level[:, c0:c1], levels)   # [cL, Jm]
                image_of_block = torch.arange(c0, c1, device=rows.device).repeat_interleave(levels)
                g = grad_best[index, image_of_block[:, None]] * valid      # [cL, Jm]
                vb = _blocks(visual[c0:c1])                                # [cL, N, D]
                s = rows[index]                                            # [cL, Jm, D]
                p = torch.bmm(vb, s.transpose(1, 2))                       # [cL, N, Jm]
                coef, toward_u = relevance_backward(vb, p, g, softmax)     # [cL, N, Jm]
                if need_rows:
                    grad_s = torch.bmm(coef.transpose(1, 2), vb).view(-1, d)   # [cL*Jm, D]
                    grad_rows += grad_s[where.reshape(-1)].view(c1 - c0, -1, d).sum(0)
                if need_visual:
                    grad_vb = torch.bmm(coef, s)
                    toward_u(grad_vb)
                    grad_visual[c0:c1] += grad_vb.view(c1 - c0, levels, n, d).transpose(1, 2)
        return grad_rows, grad_visual, None, None


def relevance_backward(vb: Tensor, p: Tensor, g: Tensor, softmax: bool):
    """What the hand-written backwards (here and in ``level_selection``) share, per block of
    cells ``vb [K, N, D]``, heatmap inputs ``p = <v_n, s> [K, N, J]`` (consumed) and incoming
    gradients ``g [K, J]`` of the relevance (formula in ``_BestLevelScores.backward``): the
    coefficients ``coef [K, N, J]`` (ds = sum_n coef_n v_n, dv_n = coef_n s + ...) and a
    function adding the rest of dv, ``- h_n (g R / r^2) u``, to a ``[K, N, D]`` gradient."""
    h, q, u = _attend(vb, p, softmax)   # relu consumes p (p becomes h)
    relevance, r, ok = _ratio(q, torch.linalg.vector_norm(u, dim=2))
    g = torch.where(ok, g, torch.zeros_like(g))
    coef = torch.bmm(vb, u.transpose(1, 2))                            # <v_n, u>
    coef.mul_(-(q / r ** 2)[:, None])
    if softmax:
        coef.add_(p).add_(1).mul_(h)
    else:
        coef.add_(h, alpha=2).masked_fill_(h <= 0, 0)
    coef.mul_((g / r)[:, None])

    def toward_u(grad_vb: Tensor) -> None:
        grad_vb.baddbmm_(h.mul_((g * relevance / r ** 2)[:, None]), u, alpha=-1)
    return coef, toward_u


def auto_chunk(rows: int, images: int, cells: int, levels: int, dim: int,
               device: torch.device | str = "cpu") -> int:
    """Images per chunk so that a chunk's working tensors (``[L, N, J]`` heatmaps and
    ``[L, J, D]`` attended features per image) hold about ``CHUNK_BUDGET`` floats."""
    budget = CHUNK_BUDGET.get(torch.device(device).type, CHUNK_BUDGET_DEFAULT)
    per_image = max(rows * levels * (cells + dim), 1)
    return int(min(max(budget // per_image, 1), max(images, 1)))


def best_level_scores(rows: Tensor, visual: Tensor, *, heatmap: str = "relu",
                      chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """Every row against every image: ``(R* [J, Bi], l* [J, Bi])`` (steps 1–4 for all pairs).

    ``rows [J, D]`` are text vectors (words or sentences), ``visual [Bi, N, L, D]``. ``chunk``
    images are processed at a time (None: sized automatically). Differentiable (once).
    """
    return _BestLevelScores.apply(*score_inputs(rows, visual, heatmap, chunk))


def score_inputs(rows: Tensor, visual: Tensor, heatmap: str, chunk: int | None) -> tuple:
    """``(rows, visual, softmax, chunk)`` checked and in the compute dtype, ``chunk`` sized
    (``auto_chunk``) when None: what every row-against-every-image scoring function takes."""
    softmax = heatmap_kind(heatmap)
    if not isinstance(rows, Tensor) or rows.dim() != 2:
        raise HeadsInputError(f"rows must be [J, D]; got {_describe(rows)}")
    _check_visual(visual, rows.shape[1])
    images, cells, levels, dim = visual.shape
    if chunk is None:
        chunk = auto_chunk(rows.shape[0], images, cells, levels, dim, rows.device)
    elif isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise HeadsInputError(f"chunk must be a positive number of images or None; got {chunk!r}")
    dtype = compute_dtype(rows, visual)
    return rows.to(dtype), visual.to(dtype), softmax, chunk


def cross_scores(words: Tensor | None, mask: Tensor | None, sentence: Tensor | None,
                 visual: Tensor, *, gamma1: float = 5.0, heatmap: str = "relu",
                 chunk: int | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Every caption against every image: ``(R_w [Bt, Bi], R_s [Bt, Bi])``.

    ``words [Bt, T, D]`` with ``mask [Bt, T]`` (True on real words; every caption needs one),
    ``sentence [Bt, D]``, ``visual [Bi, N, L, D]``, all from ``GroundingHeads``. ``R_w[b, c]`` is
    the word-based score of caption b against image c (log-sum-exp with ``gamma1`` over real
    words only), ``R_s[b, c]`` the sentence score. Pass ``words=None`` or ``sentence=None`` to
    skip one (its result is then None). ``chunk``: images processed at a time (None: see
    ``auto_chunk``). Results are float32 (float64 for float64 inputs). Differentiable once (no
    double backward).
    """
    if words is None and sentence is None:
        raise HeadsInputError("cross_scores needs words, a sentence, or both")
    if not gamma1 > 0:
        raise HeadsInputError(f"gamma1 must be positive; got {gamma1!r}")
    _check_visual(visual)
    parts, real = [], 0
    if words is not None:
        mask = _check_words(words, mask)
        parts.append(words[mask])                     # only real words are ever scored
        real = parts[0].shape[0]
    if sentence is not None:
        if not isinstance(sentence, Tensor) or sentence.dim() != 2:
            raise HeadsInputError(f"sentence must be [B, D]; got {_describe(sentence)}")
        if words is not None and sentence.shape != (words.shape[0], words.shape[2]):
            raise HeadsInputError(f"words are [B, T, D] = {_describe(words)} but sentence is "
                                  f"{_describe(sentence)}, not [B, D]")
        parts.append(sentence)
    dtype = compute_dtype(words, sentence, visual)
    rows = torch.cat([part.to(dtype) for part in parts])
    best, _ = best_level_scores(rows, visual, heatmap=heatmap, chunk=chunk)
    word_scores = sentence_scores = None
    if words is not None:
        captions, length = mask.shape
        per_word = best.new_full((captions, length, best.shape[1]), -math.inf)
        per_word = per_word.index_put((mask,), best[:real])
        word_scores = torch.logsumexp(gamma1 * per_word, dim=1) / gamma1
    if sentence is not None:
        sentence_scores = best[real:]
    return word_scores, sentence_scores


# ------------------------------------------------------------------------- matched pairs only
def _matched(text: Tensor, visual: Tensor, softmax: bool) -> tuple[Tensor, Tensor]:
    """``text [B, K, D]`` with its own image ``visual [B, N, L, D]`` → ``H [B, K, N, L]``,
    ``R [B, K, L]``, the straightforward way (B·K·L·D attended floats)."""
    dtype = compute_dtype(text, visual)
    text, visual = text.to(dtype), visual.to(dtype)
    with _no_autocast(text.device):
        p = torch.einsum("bkd,bnld->bknl", text, visual)
        heat = torch.softmax(p, dim=2) if softmax else torch.relu(p)
        attended = l2_normalize(torch.einsum("bknl,bnld->bkld", heat, visual))
        relevance = torch.einsum("bkld,bkd->bkl", attended, text)
    return heat, relevance


def word_grounding(words: Tensor, mask: Tensor | None, visual: Tensor, *,
                   heatmap: str = "relu", choice: str = "relevance") -> dict:
    """Word heatmaps of matched pairs (caption b with image b), for evaluation.

    Returns ``heatmaps H [B, T, N, L]`` (cell n = y*M + x), ``relevance R [B, T, L]``, ``level``
    ``l* [B, T]`` (int64, chosen by ``choose_levels(choice)``) and ``score R_t [B, T]`` (=
    relevance at l*). Padding words (mask False) get zero heatmaps, relevance and score, and
    level -1.
    """
    softmax = heatmap_kind(heatmap)
    mask = _check_words(words, mask)
    _check_visual(visual, words.shape[-1])
    if visual.shape[0] != words.shape[0]:
        raise HeadsInputError(f"word_grounding pairs caption b with image b; got {words.shape[0]} "
                              f"captions and {visual.shape[0]} images")
    heat, relevance = _matched(words, visual, softmax)
    level = choose_levels(heat, relevance, choice)
    score = relevance.gather(-1, level[..., None])[..., 0]
    keep = mask.to(heat.dtype)
    return {"heatmaps": heat * keep[:, :, None, None], "relevance": relevance * keep[:, :, None],
            "level": torch.where(mask, level, torch.full_like(level, -1)), "score": score * keep}


def sentence_grounding(sentence: Tensor, visual: Tensor, *, heatmap: str = "relu",
                       choice: str = "relevance") -> dict:
    """Sentence heatmaps of matched pairs: ``heatmaps H^s [B, N, L]``, ``relevance [B, L]``,
    ``level [B]`` (int64, ``choose_levels(choice)``) and ``score R_s [B]`` (relevance there)."""
    softmax = heatmap_kind(heatmap)
    if not isinstance(sentence, Tensor) or sentence.dim() != 2:
        raise HeadsInputError(f"sentence must be [B, D]; got {_describe(sentence)}")
    _check_visual(visual, sentence.shape[-1])
    if visual.shape[0] != sentence.shape[0]:
        raise HeadsInputError(f"sentence_grounding pairs sentence b with image b; got "
                              f"{sentence.shape[0]} sentences and {visual.shape[0]} images")
    heat, relevance = _matched(sentence[:, None], visual, softmax)
    level = choose_levels(heat[:, 0], relevance[:, 0], choice)
    score = relevance[:, 0].gather(-1, level[:, None])[:, 0]
    return {"heatmaps": heat[:, 0], "relevance": relevance[:, 0], "level": level, "score": score}
