"""How the relevance of a word (or sentence) is chosen among the feature levels during training.

The paper selects the level by a hard max, ``R*_t = max_l R[t, l]`` (METHOD.md "Scores", step 4;
``scores.cross_scores``). Only the selected level receives a gradient, so the level that wins the
first steps is the only one trained and wins ever after; which level that is depends on the seed
(issue 16: one run points at 98 %, the next at 80 %). The remedies here are training options,
and one (``focus``) is how grounding picks the level a word points with.

A recipe (``--level-selection``) is ``paper`` or a ``+``-joined set of these parts:

- ``aux`` — per-level auxiliary loss (deep supervision). For every level l the level's own scores
  ``R_w^l[b, c] = (1/γ1) log Σ_t exp(γ1 R[t, c, l])`` (over the caption's real words) and
  ``R_s^l[b, c] = R[s̄_b, c, l]`` also enter the two-way softmax:
  ``L_aux = (1/L) Σ_l (L_w(R_w^l) + L_s(R_s^l))`` with ``L_x`` the paper's ``matching_loss``
  (γ2; a term switched off by ``--loss-terms`` is left out here too), and the run's loss becomes
  ``L + λ L_aux`` (``--level-aux-weight λ``, default 1). Every level gets a gradient at every
  step, so none is starved.
- ``dropout`` — level dropout. At each training step every (batch image, level) is hidden with
  probability p (``--level-dropout p``, default 0.25), independently; an image with every level
  hidden keeps one, drawn uniformly. The selection of that image's pairs (max, or the soft
  selection) runs over its visible levels only: ``R*[t, c] = max_{l visible in c} R[t, c, l]``.
  The auxiliary loss, if on, still sees every level. The draws come from a generator seeded by
  (run seed, global step), so a resumed run and a run in N processes hide the same levels.
- ``soft`` — soft selection, annealed to the hard max. With training progress ``x`` in [0, 1)
  (epochs done, fractions of epochs included, over ``--epochs``) and ``a`` = ``--level-anneal``
  (default 0.5): while ``x < a``, ``R*_t = Σ_l w_l R[t, l]`` with ``w = softmax_l(R[t, l] / τ)``
  and ``τ = τ0 · TEMPERATURE_END_RATIO^(x / a)`` (``--level-temperature τ0``, default 0.1, down
  to τ0/20 — near the max); from ``x ≥ a`` on, the hard max. At a high temperature every level
  is weighted nearly equally and all of them learn; as τ falls the weights approach the max.

- ``calibrate`` — level calibration (ours). The two-way softmax is blind to a constant added
  to all of a score matrix (a softmax over captions or over images does not move), so the
  auxiliary loss, level by level, says nothing of where a level's scores sit, and the paper's
  loss only through which level wins; yet the max over levels compares exactly that. Each level's baseline is free to drift, from
  the initialisation on, and the level whose baseline happens to sit highest is chosen
  everywhere — the seed decides. Calibration pins the baselines together: with ``m_l`` the mean
  relevance ``R[t, c, l]`` of level l over the batch's mismatched pairs (every real word t of
  caption b against every image c ≠ b) and ``m̄`` their mean over levels, and ``n_l``, ``n̄`` the
  same for the sentences, ``L_cal = Σ_l (m_l − m̄)² + (n_l − n̄)²``; the loss becomes
  ``L + μ L_cal`` (``--level-calibration μ``, default 10). Then the max compares how far each
  level lifts the matched pair above a common floor: what the level sees, not where it started.
  (Measured over 4 seeds, README "Level selection": the choices still differ by seed.)

- ``guide`` — level-choice guidance (ours). Rather than leave the choice to where the levels'
  scores happen to sit, teach it: for every real word t of caption b (and every sentence) let
  ``d[t, l] = log softmax_c(γ2 R[t, c, l])[b]``, how well level l alone singles out the matched
  image among the batch's, and ``l°_t = argmax_l d[t, l]`` (no gradient). The matched pair's
  scores across levels are then trained to pick that level:
  ``L_guide = mean_t −log softmax_l(R[t, b, l] / τ_g)[l°_t]`` over words, plus the same over
  sentences, with τ_g = ``GUIDE_TEMPERATURE`` (0.1); the loss becomes ``L + κ L_guide``
  (``--level-guide κ``, default 1). The aim: the max at test time picks the level that would
  have retrieved the image best — a property of the data, not of the initialisation. (Measured on
  one seed only, README "Level selection": below ``aux`` there.)

- ``focus`` — the level a text grounds with (evaluation, validation, ``ground``) is the one whose
  heatmap is most focused, ``argmax_l max_n H[n, l]² / Σ_n H[n, l]²``
  (``scores.choose_levels``), rather than the one of highest relevance; training is unchanged.
  With ``aux`` every level learns to retrieve and their relevances end up within a few
  hundredths of each other, so which is highest is decided by the seed (measured: the leading
  level differed in every seed); how focused each level's map is follows the maps themselves.
  (Measured over 5 seeds, README "Level selection": the same leading level in every seed.)
  Part of the focus's steadiness is the levels' resolution: a level computed at a coarser grid
  than the cached one is upsampled bilinearly, so its maps are smooth and rarely the most
  focused.

In a process group (``heads/distributed.py``) each process scores the whole batch's text against
its own images at every level, the ``[J, b, L]`` blocks are gathered into ``[J, B, L]`` and every
process selects and computes the loss on the whole batch, as for the paper's scores.

The recipes need every level's relevance of every (text, image) pair with its gradient:
``all_level_scores`` computes ``R [J, Bi, L]`` with a hand-written backward like
``scores._BestLevelScores`` (memory bounded by the image chunk), but for every level, so its
backward costs about L times the paper path's (which only works on the selected level). The
``paper`` recipe keeps ``scores.cross_scores`` exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from multigrounding.errors import MultigroundingError
from multigrounding.heads.distributed import batch_scores, gather_columns
from multigrounding.heads.losses import matching_loss
from multigrounding.heads.scores import (HeadsInputError, _attend, _blocks, _check_visual,
                                         _check_words, _describe, _no_autocast, _ratio,
                                         compute_dtype, relevance_backward, score_inputs)

PAPER = "paper"
PARTS = ("aux", "dropout", "soft", "calibrate", "guide", "focus")
TEMPERATURE_END_RATIO = 0.05     # the soft selection's temperature ends at τ0 / 20
GUIDE_TEMPERATURE = 0.1          # guide: the temperature of the softmax over levels


class LevelSelectionError(MultigroundingError, ValueError):
    """A level-selection recipe or one of its parameters is not valid."""


def parse_recipe(recipe: str) -> frozenset[str]:
    """``"paper"`` → ``{}``; ``"aux+soft"`` → ``{"aux", "soft"}``; anything else is an error."""
    if not isinstance(recipe, str) or not recipe.strip():
        raise LevelSelectionError(f"level_selection must be 'paper' or parts of {', '.join(PARTS)} "
                                  f"joined by '+'; got {recipe!r}")
    if recipe == PAPER:
        return frozenset()
    parts = [part.strip() for part in recipe.split("+")]
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise LevelSelectionError(f"level_selection {recipe!r}: unknown part {unknown[0]!r}; use "
                                  f"'paper' or parts of {', '.join(PARTS)} joined by '+' "
                                  f"(e.g. 'aux+soft')")
    if len(set(parts)) != len(parts):
        raise LevelSelectionError(f"level_selection {recipe!r} names a part twice")
    return frozenset(parts)


@dataclass(frozen=True)
class LevelSelection:
    """A parsed recipe and its parameters (module docstring)."""

    parts: frozenset[str] = frozenset()
    aux_weight: float = 1.0
    dropout: float = 0.25
    temperature: float = 0.1
    anneal: float = 0.5
    calibration: float = 10.0
    guide: float = 1.0

    @classmethod
    def of(cls, recipe: str, *, aux_weight: float = 1.0, dropout: float = 0.25,
           temperature: float = 0.1, anneal: float = 0.5, calibration: float = 10.0,
           guide: float = 1.0) -> "LevelSelection":
        selection = cls(parse_recipe(recipe), float(aux_weight), float(dropout),
                        float(temperature), float(anneal), float(calibration), float(guide))
        selection.check()
        return selection

    def check(self) -> None:
        if not (math.isfinite(self.aux_weight) and self.aux_weight > 0):
            raise LevelSelectionError(f"level_aux_weight must be positive; got {self.aux_weight!r}")
        if not 0 <= self.dropout < 1:
            raise LevelSelectionError(f"level_dropout is a probability in [0, 1); got {self.dropout!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise LevelSelectionError(f"level_temperature must be positive; got {self.temperature!r}")
        if not 0 < self.anneal <= 1:
            raise LevelSelectionError(f"level_anneal is a fraction of training in (0, 1]; got "
                                      f"{self.anneal!r}")
        if not (math.isfinite(self.calibration) and self.calibration > 0):
            raise LevelSelectionError(f"level_calibration must be positive; got {self.calibration!r}")
        if not (math.isfinite(self.guide) and self.guide > 0):
            raise LevelSelectionError(f"level_guide must be positive; got {self.guide!r}")

    @property
    def is_paper(self) -> bool:
        """Whether training is the paper's (``focus`` changes only how grounding picks levels)."""
        return not self.parts - {"focus"}

    def temperature_at(self, progress: float) -> float | None:
        """τ of the soft selection at training ``progress`` in [0, 1]; None: the hard max."""
        if "soft" not in self.parts or progress >= self.anneal:
            return None
        return self.temperature * TEMPERATURE_END_RATIO ** (progress / self.anneal)

    def needs_all_levels(self, progress: float, training: bool = True) -> bool:
        """Whether the step needs every level's scores (else the paper's ``cross_scores``)."""
        return bool({"aux", "calibrate", "guide"} & self.parts) or self.temperature_at(progress) is not None \
            or (training and "dropout" in self.parts and self.dropout > 0)


def level_choice(recipe: str | None) -> str:
    """How a run trained with ``recipe`` grounds (``scores.choose_levels``); a saved config
    without the setting (None) was trained, and is grounded, as the paper's."""
    return "focus" if "focus" in parse_recipe(recipe or PAPER) else "relevance"


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of level dropout at global ``step`` of the run ``seed``: the same draws
    after a resume and in every process."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, 16]).generate_state(1)[0]))


# ------------------------------------------------------------------------ every level's score
class _AllLevelScores(torch.autograd.Function):
    """``rows [J, D]`` × ``visual [Bi, N, L, D]`` → ``R [J, Bi, L]``, every level's relevance.

    The maths of ``scores._BestLevelScores`` without the max: per image chunk the heatmaps and
    attended features are formed, the relevances kept, the rest dropped; the backward pass
    recomputes them per chunk and applies the same exact gradient to every level.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, visual: Tensor, softmax: bool, chunk: int):
        with _no_autocast(rows.device):
            count = rows.shape[0]
            images, _, levels, _ = visual.shape
            out = rows.new_empty(count, images, levels)
            for c0 in range(0, images, chunk):
                c1 = min(c0 + chunk, images)
                vb = _blocks(visual[c0:c1])                                  # [cL, N, D]
                _, q, u = _attend(vb, torch.matmul(vb, rows.t()), softmax)   # [cL, J], [cL, J, D]
                relevance, _, _ = _ratio(q, torch.linalg.vector_norm(u, dim=2))
                out[:, c0:c1] = relevance.view(c1 - c0, levels, count).permute(2, 0, 1)
        ctx.softmax, ctx.chunk = softmax, chunk
        ctx.save_for_backward(rows, visual)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        # The formula of _BestLevelScores.backward (see there), for every (row, image, level):
        #   coef_n = (g / r) [p_n > 0] (2 p_n - beta <v_n, u>)      (relu)
        #   coef_n = (g / r) h_n (1 + p_n - beta <v_n, u>)          (exp, the softmax ablation)
        #   ds = sum_n coef_n v_n,   dv_n = coef_n s - h_n (g R / r^2) u,   beta = q / r^2.
        rows, visual = ctx.saved_tensors
        softmax, chunk = ctx.softmax, ctx.chunk
        need_rows, need_visual = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_rows = torch.zeros_like(rows) if need_rows else None
        grad_visual = torch.zeros_like(visual) if need_visual else None
        with _no_autocast(rows.device):
            grad = grad.to(rows.dtype)
            images, n, levels, d = visual.shape
            count = rows.shape[0]
            for c0 in range(0, images, chunk):
                c1 = min(c0 + chunk, images)
                g = grad[:, c0:c1].permute(1, 2, 0).reshape((c1 - c0) * levels, count)   # [cL, J]
                if not bool(g.any()):
                    continue
                vb = _blocks(visual[c0:c1])                                  # [cL, N, D]
                p = torch.matmul(vb, rows.t())                               # [cL, N, J]
                coef, toward_u = relevance_backward(vb, p, g, softmax)       # [cL, N, J]
                if need_rows:
                    grad_rows += torch.einsum("knj,knd->jd", coef, vb)
                if need_visual:
                    grad_vb = torch.matmul(coef, rows)                       # [cL, N, D]
                    toward_u(grad_vb)
                    grad_visual[c0:c1] += grad_vb.view(c1 - c0, levels, n, d).transpose(1, 2)
        return grad_rows, grad_visual, None, None


def all_level_scores(rows: Tensor, visual: Tensor, *, heatmap: str = "relu",
                     chunk: int | None = None) -> Tensor:
    """Every row against every image at every level: ``R [J, Bi, L]`` (differentiable once).

    ``rows [J, D]`` are text vectors, ``visual [Bi, N, L, D]``; ``chunk`` images at a time
    (None: sized as ``scores.auto_chunk``). ``R.max(-1)`` equals ``scores.best_level_scores``.
    """
    return _AllLevelScores.apply(*score_inputs(rows, visual, heatmap, chunk))


# ---------------------------------------------------------------------------------- selection
def select_levels(relevance: Tensor, temperature: float | None = None,
                  visible: Tensor | None = None) -> Tensor:
    """``R [J, Bi, L]`` → ``R* [J, Bi]``: the hard max over levels (``temperature`` None) or the
    softmax-weighted mean ``Σ_l softmax_l(R / τ) R``; ``visible [Bi, L]`` (bool) restricts both to
    each image's visible levels."""
    hidden = None if visible is None else ~visible[None]                   # [1, Bi, L]
    if temperature is None:
        masked = relevance if hidden is None else relevance.masked_fill(hidden, -math.inf)
        return masked.max(dim=-1).values
    logits = relevance / temperature
    if hidden is not None:
        logits = logits.masked_fill(hidden, -math.inf)
        relevance = relevance.masked_fill(hidden, 0.0)
    return (torch.softmax(logits, dim=-1) * relevance).sum(-1)


def visible_levels(images: int, levels: int, dropout: float, *, device=None,
                   generator: torch.Generator | None = None) -> Tensor:
    """``[images, levels]`` bool: each level kept with probability 1 - ``dropout``; an image that
    lost every level gets one back, drawn uniformly."""
    keep = torch.rand(images, levels, generator=generator, device=device) >= dropout
    empty = ~keep.any(dim=1)
    if bool(empty.any()):
        pick = torch.randint(levels, (images,), generator=generator, device=device)
        keep[empty, pick[empty]] = True
    return keep


def caption_scores(per_word: Tensor, mask: Tensor, gamma1: float) -> Tensor:
    """Per-word scores of the real words ``[J_real, Bi, ...]`` → ``(1/γ1) log Σ_t exp(γ1 ·)``
    per caption ``[Bt, Bi, ...]`` (padding never enters)."""
    captions, length = mask.shape
    full = per_word.new_full((captions, length, *per_word.shape[1:]), -math.inf)
    full = full.index_put((mask,), per_word)
    return torch.logsumexp(gamma1 * full, dim=1) / gamma1


@dataclass
class LevelScores:
    """What ``level_cross_scores`` returns, for the whole batch: the selected scores
    (``[Bt, B]``), per level the scores the auxiliary loss uses (``[Bt, B, L]``), and every real
    word's and sentence's relevance at every level (``[J, B, L]``, for the calibration)."""

    word: Tensor | None
    sentence: Tensor | None
    word_levels: Tensor | None
    sentence_levels: Tensor | None
    word_relevance: Tensor | None = None
    sentence_relevance: Tensor | None = None
    mask: Tensor | None = None


def level_cross_scores(words: Tensor | None, mask: Tensor | None, sentence: Tensor | None,
                       visual: Tensor, selection: LevelSelection, *, progress: float = 0.0,
                       training: bool = True, gamma1: float = 5.0, heatmap: str = "relu",
                       chunk: int | None = None,
                       generator: torch.Generator | None = None) -> LevelScores:
    """``distributed.batch_scores`` with the recipe's selection (module docstring) at
    ``progress``: the whole batch's text (``gather_text``'s output) against this process's
    images ``visual [b, N, L, D]``; without a process group b = B.

    Level dropout applies only when ``training``, drawn for the whole batch from ``generator``;
    the soft selection follows ``progress``.
    """
    if words is None and sentence is None:
        raise HeadsInputError("level_cross_scores needs words, a sentence, or both")
    _check_visual(visual)
    parts, real = [], 0
    if words is not None:
        mask = _check_words(words, mask)
        parts.append(words[mask])
        real = parts[0].shape[0]
    if sentence is not None:
        if not isinstance(sentence, Tensor) or sentence.dim() != 2:
            raise HeadsInputError(f"sentence must be [B, D]; got {_describe(sentence)}")
        if words is not None and sentence.shape != (words.shape[0], words.shape[2]):
            raise HeadsInputError(f"words are [B, T, D] = {_describe(words)} but sentence is "
                                  f"{_describe(sentence)}, not [B, D]")
        parts.append(sentence)
    if not selection.needs_all_levels(progress, training):     # the soft recipe once annealed
        word, sent = batch_scores(words, mask, sentence, visual, gamma1=gamma1, heatmap=heatmap,
                                  chunk=chunk)
        return LevelScores(word, sent, None, None)
    aux = "aux" in selection.parts
    dropout = training and "dropout" in selection.parts and selection.dropout > 0
    temperature = selection.temperature_at(progress)
    dtype = compute_dtype(words, sentence, visual)
    rows = torch.cat([part.to(dtype) for part in parts])
    relevance = gather_columns(all_level_scores(rows, visual, heatmap=heatmap, chunk=chunk))  # [J, B, L]
    visible = None
    if dropout:
        visible = visible_levels(relevance.shape[1], relevance.shape[2], selection.dropout,
                                 generator=generator).to(relevance.device)
    best = select_levels(relevance, temperature, visible)
    result = LevelScores(None, None, None, None, mask=mask)
    if words is not None:
        result.word = caption_scores(best[:real], mask, gamma1)
        result.word_relevance = relevance[:real]
        if aux:
            result.word_levels = caption_scores(relevance[:real], mask, gamma1)
    if sentence is not None:
        result.sentence = best[real:]
        result.sentence_relevance = relevance[real:]
        if aux:
            result.sentence_levels = relevance[real:]
    return result


def level_aux_loss(scores: LevelScores, *, gamma2: float = 10.0, use_words: bool = True,
                   use_sentence: bool = True) -> Tensor:
    """``L_aux = (1/L) Σ_l (L_w(R_w^l) + L_s(R_s^l))`` over the terms in use (module docstring)."""
    terms = [levels for levels, used in ((scores.word_levels, use_words),
                                         (scores.sentence_levels, use_sentence)) if used]
    if not terms or any(levels is None for levels in terms):
        raise HeadsInputError("level_aux_loss needs the per-level scores of every term in use "
                              "(level_cross_scores with an 'aux' recipe)")
    levels = terms[0].shape[-1]
    return sum(matching_loss(term[..., l], gamma2) for term in terms for l in range(levels)) / levels


def level_calibration_loss(scores: LevelScores, *, use_words: bool = True,
                           use_sentence: bool = True) -> Tensor:
    """``L_cal = Σ_l (m_l − m̄)² + (n_l − n̄)²`` over the terms in use (module docstring): the
    spread over levels of each level's mean relevance on the mismatched pairs."""
    terms = _relevance_terms(scores, use_words, use_sentence, "level_calibration_loss",
                             "calibrate")
    total = 0
    for relevance, owner in terms:
        images = torch.arange(relevance.shape[1], device=relevance.device)
        mismatched = (owner[:, None] != images[None, :]).to(relevance.dtype)    # [J, B]
        means = (relevance * mismatched[..., None]).sum((0, 1)) / mismatched.sum()   # [L]
        total = total + ((means - means.mean()) ** 2).sum()
    return total


def _relevance_terms(scores: "LevelScores", use_words: bool, use_sentence: bool, loss: str,
                     part: str) -> list[tuple[Tensor, Tensor]]:
    """Every level's relevance ``[J, B, L]`` of the terms in use, each with the caption that owns
    its rows ``[J]`` (a word's caption; a sentence is its own)."""
    terms = []
    if use_words:
        if scores.word_relevance is None:
            raise HeadsInputError(f"{loss} needs every level's word relevance "
                                  f"(level_cross_scores with a '{part}' recipe)")
        caption = torch.arange(scores.mask.shape[0], device=scores.mask.device)
        owner = caption[:, None].expand_as(scores.mask)[scores.mask]            # [J] caption of word
        terms.append((scores.word_relevance, owner))
    if use_sentence:
        if scores.sentence_relevance is None:
            raise HeadsInputError(f"{loss} needs every level's sentence relevance "
                                  f"(level_cross_scores with a '{part}' recipe)")
        relevance = scores.sentence_relevance
        terms.append((relevance, torch.arange(relevance.shape[0], device=relevance.device)))
    if not terms:
        raise HeadsInputError(f"{loss}: no term in use")
    return terms


def level_guide_loss(scores: LevelScores, *, gamma2: float = 10.0, use_words: bool = True,
                     use_sentence: bool = True) -> Tensor:
    """``L_guide`` over the terms in use (module docstring): the matched pair's scores over the
    levels, as logits at ``GUIDE_TEMPERATURE``, against the level that best retrieves the image."""
    terms = _relevance_terms(scores, use_words, use_sentence, "level_guide_loss", "guide")
    total = 0
    for relevance, owner in terms:                              # relevance [J, B, L], owner [J]
        rows = torch.arange(relevance.shape[0], device=relevance.device)
        with torch.no_grad():
            retrieval = torch.log_softmax(gamma2 * relevance, dim=1)[rows, owner]      # [J, L]
            target = retrieval.argmax(dim=-1)
        matched = relevance[rows, owner]                                                # [J, L]
        total = total + torch.nn.functional.cross_entropy(matched / GUIDE_TEMPERATURE, target)
    return total
