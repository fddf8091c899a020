"""Running trained heads on cached or fresh features: the one place that maps a batch into the
common space and turns word and sentence groundings into a phrase's heatmap at a level.

Training (``trainer._step``), the pointing game, retrieval's score matrix and grounding one image
all go through these functions, so they cannot drift apart.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from multigrounding.heads.model import GroundingHeads


def to_device(array, device: str | torch.device) -> Tensor:
    """A cached array (or tensor) on ``device``, float32; pinned and non-blocking to a GPU."""
    tensor = array if isinstance(array, Tensor) else torch.from_numpy(np.asarray(array))
    if torch.device(device).type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    else:
        tensor = tensor.to(device)
    return tensor.float() if tensor.is_floating_point() else tensor


def map_images(heads: GroundingHeads, levels: Sequence, device) -> Tensor:
    """Cached levels ``[B, M, M, C_k]`` → ``v [B, N, L, D]``."""
    return heads.map_visual([to_device(level, device) for level in levels])


def map_text(heads: GroundingHeads, tokens=None, sentence=None, device="cpu"
             ) -> tuple[Tensor | None, Tensor | None]:
    """Cached word layers → ``s [B, T, D]`` and sentence vectors → ``s̄ [B, D]`` (either may be
    skipped with None)."""
    words = heads.map_words(to_device(tokens, device)) if tokens is not None else None
    mapped = heads.map_sentence(to_device(sentence, device)) if sentence is not None else None
    return words, mapped


def map_batch(model, batch, device) -> tuple[Tensor, Tensor, Tensor]:
    """A training batch's ``(v, s, s̄)`` in one forward call of ``model`` (the heads, or the heads
    inside DistributedDataParallel, which must be called, not its methods)."""
    return model([to_device(level, device) for level in batch.visual],
                 to_device(batch.tokens, device), to_device(batch.sentence, device))


def phrase_map(word_maps: Tensor, weights: Tensor) -> Tensor | None:
    """The phrase heatmap: its words' maps [W, M, M] averaged with weights R_t; None if all 0."""
    total = weights.sum()
    if not bool(total > 0):
        return None
    return (word_maps * weights[:, None, None]).sum(0) / total


def phrase_heatmap(grounded: dict, b: int, positions: list[int], grid: int
                   ) -> tuple[Tensor | None, int]:
    """The heatmap [M, M] of words ``positions`` of sequence ``b`` (``word_grounding``'s output),
    each word at its chosen level weighted by its score R_t, and the level of its most relevant
    word."""
    chosen = grounded["level"][b, positions]
    scores = grounded["score"][b, positions]
    maps = torch.stack([grounded["heatmaps"][b, t, :, chosen[i]] for i, t in enumerate(positions)])
    heat = phrase_map(maps.reshape(-1, grid, grid).cpu(), scores.clamp(min=0).cpu())
    return heat, int(chosen[int(torch.argmax(scores))])


def sentence_heatmap(grounded: dict, b: int, grid: int) -> tuple[Tensor | None, int]:
    """The heatmap [M, M] of sentence ``b`` (``sentence_grounding``'s output) at its chosen level;
    None when no cell is positive."""
    level = int(grounded["level"][b])
    heat = grounded["heatmaps"][b, :, level].reshape(grid, grid).cpu()
    return (heat if bool((heat > 0).any()) else None), level


def grid_of(visual: Tensor) -> int:
    """M, from ``v [B, N, L, D]`` with N = M·M."""
    return int(round(visual.shape[1] ** 0.5))
