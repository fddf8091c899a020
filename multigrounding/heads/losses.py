"""The two-way batch softmax loss (METHOD.md "Loss").

For a batch of B matched (caption b, image b) pairs and all B×B cross scores ``R[b, c]``
(caption b against image c):

    P(S_b | I_b) = softmax_b'(gamma2 R[b', b])[b]     (which caption fits image b)
    P(I_b | S_b) = softmax_c(gamma2 R[b, c])[b]       (which image fits caption b)
    L_x = -mean_b [log P(S_b | I_b) + log P(I_b | S_b)]   for x in {w (words), s (sentence)}
    L   = L_w + L_s + weight_decay * penalty              (penalty = ½ Σ w² of the visual kernels)

Computed in float32 (float64 stays) with log-softmax, so it never takes the log of a rounded 0.
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
