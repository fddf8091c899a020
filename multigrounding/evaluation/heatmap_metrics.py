"""The pointing game and attention correctness on one heatmap (METHOD.md, "Test-time heatmaps
and metrics"): bilinear resize to the original image, argmax, hit if inside any box (borders
included), the share of the map's mass inside the boxes, the baselines, and which phrases are
skipped and why. (How a phrase's heatmap is made from its words' maps is the heads' business:
``heads.inference.phrase_map``.)"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from multigrounding.datasets.records import NOBOX, NOTVISUAL, SCENE, Phrase

MIN_UNION_FRACTION = 0.05
SKIPPED_TYPES = (NOTVISUAL, SCENE, NOBOX)


def skip_reason(phrase: Phrase, width: int, height: int) -> str | None:
    """Why a phrase is not scored (notvisual, no box, union box < 5% of the image), or None."""
    if phrase.type in SKIPPED_TYPES:
        return phrase.type
    if not phrase.boxes:
        return "no box"
    boxes = np.asarray(phrase.boxes, dtype=np.float64)
    union = (boxes[:, 2].max() - boxes[:, 0].min()) * (boxes[:, 3].max() - boxes[:, 1].min())
    if union < MIN_UNION_FRACTION * width * height:
        return "small"
    return None


def resize_to_image(heatmap: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinear resize of an [M, M] map to [height, width] (cell centres, align_corners=False)."""
    return F.interpolate(heatmap[None, None].float(), size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0]


def point(heatmap: torch.Tensor | None, width: int, height: int) -> tuple[int, int] | None:
    """The (x, y) pixel the heatmap points at in the original image; None for no heatmap or an
    all-zero one (a miss)."""
    if heatmap is None or not bool((heatmap > 0).any()):
        return None
    return _argmax(resize_to_image(heatmap, width, height))


def _argmax(full: torch.Tensor) -> tuple[int, int]:
    index = int(torch.argmax(full))
    return index % full.shape[1], index // full.shape[1]


def point_and_correctness(heatmap: torch.Tensor | None, boxes: list[list[float]], width: int,
                          height: int) -> tuple[tuple[int, int] | None, float]:
    """``point`` and ``attention_correctness`` with one resize (evaluation's per-phrase cost)."""
    if heatmap is None or not bool((heatmap > 0).any()):
        return None, 0.0
    full = resize_to_image(heatmap, width, height)
    return _argmax(full), _mass_inside(full, boxes, width, height)


def is_hit(xy: tuple[int, int] | None, boxes: list[list[float]]) -> bool:
    """Inside any box, borders included, in original pixel coordinates; no tolerance."""
    if xy is None:
        return False
    x, y = xy
    return any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in boxes)


def attention_correctness(heatmap: torch.Tensor | None, boxes: list[list[float]], width: int,
                          height: int) -> float:
    """The share of the heatmap's mass (resized, normalised to sum 1) inside the boxes."""
    if heatmap is None:
        return 0.0
    return _mass_inside(resize_to_image(heatmap, width, height), boxes, width, height)


def _mass_inside(full: torch.Tensor, boxes, width: int, height: int) -> float:
    full = full.clamp(min=0)
    total = float(full.sum())
    if total <= 0:
        return 0.0
    inside = torch.from_numpy(box_mask(boxes, width, height).astype(np.float32))
    return float((full * inside).sum()) / total


def center_hit(boxes: list[list[float]], width: int, height: int) -> bool:
    """The center baseline: does the image's central pixel lie in a box?"""
    return is_hit((width // 2, height // 2), boxes)


def random_hit_rate(boxes: list[list[float]], width: int, height: int) -> float:
    """The random-point baseline as its exact expectation: the share of the image's pixels inside
    any box (borders included), i.e. the hit rate of a uniformly random pixel, without sampling
    noise."""
    return float(box_mask(boxes, width, height).mean())


def box_mask(boxes: list[list[float]], width: int, height: int) -> np.ndarray:
    """[height, width] bool: the pixels inside any box, borders included."""
    inside = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside[max(0, int(np.ceil(y0))):int(np.floor(y1)) + 1,
               max(0, int(np.ceil(x0))):int(np.floor(x1)) + 1] = True
    return inside
