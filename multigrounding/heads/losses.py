"""The two-way batch softmax loss (METHOD.md "Loss").

For a batch of B matched (caption b, image b) pairs and all B×B cross scores ``R[b, c]``
(caption b against image c):

    P(S_b | I_b) = softmax_b'(gamma2 R[b', b])[b]     (which caption fits image b)
    P(I_b | S_b) = softmax_c(gamma2 R[b, c])[b]       (which image fits caption b)
    L_x = -mean_b [log P(S_b | I_b) + log P(I_b | S_b)]   for x in {w (words), s (sentence)}
    L   = L_w + L_s + weight_decay * penalty              (penalty = ½ Σ w² of the visual kernels)

Computed in float32 (float64 stays) with log-softmax, so it never takes the log of a rounded 0.

Two retrieval losses from the other seed papers work on one caption–image score matrix ``S``
(``R_w + R_s``, ``R_w`` or ``R_s``, by ``--loss-terms``), the diagonal being the matched pairs:

- ``npair_loss`` (Das et al. 2019, after Sohn's N-pair loss), both directions:
  ``mean_b log(1 + sum_{c != b} exp(s (S[b, c] - S[b, b])))`` (caption → image) plus
  ``mean_c log(1 + sum_{b != c} exp(s (S[b, c] - S[c, c])))`` (image → caption). Sohn's
  embeddings are unnormalised; ours are cosines, so a scale ``s`` stands in for their norm
  (default 10, the γ2 of the paper's loss). It equals ``matching_loss`` on ``S`` — what differs
  from the multigrounding loss is one softmax over a single score rather than one per score.
- ``triplet_hard_loss`` (VSE++, Faghri et al. 2018): the hinge with the hardest in-batch negative,
  ``mean_b [m - S[b, b] + max_{c != b} S[b, c]]_+ + [m - S[b, b] + max_{b' != b} S[b', b]]_+``,
  margin m (default 0.2). VSE++ sums over the batch; the mean keeps the learning rate independent
  of B. With ``hardest=False`` every negative counts (the sum of hinges, VSE++'s "VSE0"): from
  freshly initialised heads the hardest-negative loss alone collapses here (every score alike, the
  hinge at its margin; measured on the synthetic data: retrieval at chance), so the trainer warms up
  with the sum for ``triplet_warmup`` epochs, as later VSE work does.

The phrase-level term (after SSAMT's phrase labels; ``phrase_matching_loss``). Each label q (an
entity or a triple of the caption of batch image b_q) is scored against every batch image c with
the same multi-level attention as a caption, over its own words only (inside its caption):
``P[q, c] = (1/γ1) log sum_{t in q} exp(γ1 R*_t(c))``. Image c's negatives are the labels of other
batch captions whose key (lowercase text without articles) none of c's captions — all of them, not
only the one in the batch — carries; ``neg[q, c]`` marks them. For every label, with γ2 as above:

    image → phrase:  -log [ e^{γ2 P[q, b_q]} / (e^{γ2 P[q, b_q]} + sum_{n: neg[n, b_q]} e^{γ2 P[n, b_q]}) ]
    phrase → image:  -log [ e^{γ2 P[q, b_q]} / (e^{γ2 P[q, b_q]} + sum_{c: neg[q, c]} e^{γ2 P[q, c]}) ]
    L_p = mean_q (image → phrase) + mean_q (phrase → image),   L += w · L_p   (``--phrase-loss w``)

so a phrase that does not belong to an image is pushed below the ones that do, in both directions —
the two-way softmax of the main loss, with labels in place of captions.
"""
from __future__ import annotations

import torch
from torch import Tensor

from multigrounding.heads.scores import HeadsInputError, compute_dtype


def matching_loss(scores: Tensor, gamma2: float = 10.0) -> Tensor:
    """``-mean_b [log softmax_b'(γ2 scores[b', b])[b] + log softmax_c(γ2 scores[b, c])[b]]``.

    ``scores [B, B]``: ``scores[b, c]`` is caption b against image c; the diagonal holds the
    matched pairs.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != scores.shape[1] \
            or scores.shape[0] == 0:
        got = list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise HeadsInputError(f"matching_loss needs square scores [B, B] (caption b vs image c, "
                              f"B >= 1); got {got}")
    logits = gamma2 * scores.to(compute_dtype(scores))
    caption_given_image = torch.log_softmax(logits, dim=0).diagonal()
    image_given_caption = torch.log_softmax(logits, dim=1).diagonal()
    return -(caption_given_image + image_given_caption).mean()


def grounding_loss(R_w: Tensor | None, R_s: Tensor | None, penalty: Tensor | float | None, *,
                   gamma2: float = 10.0, weight_decay: float = 5e-4, use_words: bool = True,
                   use_sentence: bool = True) -> dict:
    """The training objective and its parts.

    Returns ``{"loss": L_w + L_s + weight_decay * penalty, "word": L_w, "sentence": L_s,
    "l2": weight_decay * penalty}`` with the terms switched off by ``use_words`` /
    ``use_sentence`` left out of ``loss``. A switched-off term is still reported (detached, for
    logging) when its scores are given, else None. ``penalty`` is ``GroundingHeads.l2_penalty()``
    (None counts as 0).
    """
    if not (use_words or use_sentence):
        raise HeadsInputError("grounding_loss: use_words and use_sentence are both off; at least "
                              "one score has to be trained")
    terms = {}
    for name, scores, used in (("word", R_w, use_words), ("sentence", R_s, use_sentence)):
        if scores is None:
            if used:
                raise HeadsInputError(f"grounding_loss: the {name} term is on but its scores are "
                                      f"None; pass them or switch the term off")
            terms[name] = None
            continue
        value = matching_loss(scores, gamma2)
        terms[name] = value if used else value.detach()
    used_terms = [terms[name] for name, used in (("word", use_words), ("sentence", use_sentence))
                  if used]
    reference = used_terms[0]
    if penalty is None:
        penalty = 0.0
    penalty = torch.as_tensor(penalty, device=reference.device)
    l2 = weight_decay * penalty.to(reference.dtype)
    loss = sum(used_terms[1:], used_terms[0]) + l2
    return {"loss": loss, "word": terms["word"], "sentence": terms["sentence"], "l2": l2}


def _check_square(scores, name: str) -> None:
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != scores.shape[1] \
            or scores.shape[0] < 2:
        got = list(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise HeadsInputError(f"{name} needs square scores [B, B] (caption b vs image c, B >= 2: "
                              f"a negative is needed); got {got}")


def npair_loss(scores: Tensor, scale: float = 10.0) -> Tensor:
    """The bidirectional N-pair loss on ``scores [B, B]`` (module docstring)."""
    _check_square(scores, "npair_loss")
    x = scale * scores.to(compute_dtype(scores))
    diagonal = x.diagonal()
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    to_images = (x - diagonal[:, None]).masked_fill(eye, float("-inf"))    # row b: captions b
    to_captions = (x - diagonal[None, :]).masked_fill(eye, float("-inf"))  # column c: image c
    zero = torch.zeros(len(x), 1, dtype=x.dtype, device=x.device)
    return (torch.logsumexp(torch.cat([zero, to_images], 1), 1).mean()
            + torch.logsumexp(torch.cat([zero, to_captions.T], 1), 1).mean())


def triplet_hard_loss(scores: Tensor, margin: float = 0.2, hardest: bool = True) -> Tensor:
    """Max-margin with the hardest in-batch negative (or, ``hardest=False``, the sum over every
    negative), both directions (VSE++; module docstring)."""
    _check_square(scores, "triplet_hard_loss")
    x = scores.to(compute_dtype(scores))
    diagonal = x.diagonal()
    eye = torch.eye(len(x), dtype=torch.bool, device=x.device)
    if not hardest:
        to_images = torch.relu(margin - diagonal[:, None] + x).masked_fill(eye, 0).sum(1)
        to_captions = torch.relu(margin - diagonal[None, :] + x).masked_fill(eye, 0).sum(0)
        return to_images.mean() + to_captions.mean()
    negatives = x.masked_fill(eye, float("-inf"))
    hardest_image = negatives.max(dim=1).values       # for caption b
    hardest_caption = negatives.max(dim=0).values     # for image c
    return (torch.relu(margin - diagonal + hardest_image).mean()
            + torch.relu(margin - diagonal + hardest_caption).mean())


def phrase_matching_loss(scores: Tensor, caption: Tensor, negative: Tensor, gamma2: float = 10.0) -> Tensor:
    """The phrase-level term (module docstring): ``scores [Q, B]`` label q vs batch image c,
    ``caption [Q]`` each label's own batch image, ``negative [Q, B]`` bool."""
    if scores.dim() != 2 or negative.shape != scores.shape or caption.shape != scores.shape[:1]:
        raise HeadsInputError(f"phrase_matching_loss needs scores [Q, B], caption [Q] and negative "
                              f"[Q, B]; got {list(scores.shape)}, {list(caption.shape)}, "
                              f"{list(negative.shape)}")
    if scores.shape[0] == 0:
        return scores.sum() * 0.0
    logits = gamma2 * scores.to(compute_dtype(scores))
    labels = torch.arange(len(logits), device=logits.device)
    own = logits[labels, caption]                                          # [Q]
    to_images = logits.masked_fill(~negative, float("-inf"))
    to_images[labels, caption] = own
    phrase_to_image = torch.logsumexp(to_images, dim=1) - own
    # image b_q's candidates: label q itself and every n with negative[n, b_q]
    column = logits[:, caption].T                                          # [Q, Q]: row q, label n
    allowed = negative[:, caption].T | torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    image_to_phrase = torch.logsumexp(column.masked_fill(~allowed, float("-inf")), dim=1) - own
    return image_to_phrase.mean() + phrase_to_image.mean()
