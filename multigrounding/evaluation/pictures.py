"""Pictures of a grounding result: heatmap, ground-truth boxes and the pointed pixel over the photo.

Drawn at the original image's size, with the pointing game's own resize, so a pixel in the picture
is the pixel that was scored. Layers, bottom to top: photo, heatmap, label band, boxes, point —
the scored evidence is never covered.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from multigrounding.atomic import atomic_open
from multigrounding.errors import MultigroundingError, UnknownNameError
from multigrounding.evaluation.heatmap_metrics import resize_to_image

logger = logging.getLogger(__name__)

BOX_COLOUR = (0, 255, 0)
POINT_COLOUR = (255, 0, 0)
POINT_OUTLINE = (255, 255, 255)
BAND_COLOUR = (0, 0, 0, 160)
TEXT_COLOUR = (255, 255, 255, 255)
ELLIPSIS = "\u2026"


class PictureError(MultigroundingError, ValueError):
    """A picture was asked for with an input it cannot show (bad heatmap, alpha, point, box)."""


def overlay(image: Image.Image, heatmap, boxes=(), point=None, *, label: str | None = None,
            alpha: float = 0.5, colormap: str = "jet") -> Image.Image:
    """A new RGB picture of ``image``'s size with the heatmap, boxes, point and label drawn on it.

    The heatmap (non-negative; negatives count as 0, as in attention correctness) is divided by
    its max and blended as ``image*(1-alpha*m) + colour*(alpha*m)``: the colour's weight follows
    the map, so cold areas keep the photo unchanged instead of being tinted blue.
    """
    if not isinstance(image, Image.Image):
        raise PictureError(f"image must be a PIL image, got {type(image).__name__}")
    width, height = image.size
    if width < 1 or height < 1:
        raise PictureError(f"image is empty ({width}x{height})")
    if not 0 <= alpha <= 1:
        raise PictureError(f"alpha must be between 0 and 1, got {alpha}")
    if colormap not in matplotlib.colormaps:
        raise UnknownNameError("colormap", colormap, sorted(matplotlib.colormaps))
    xy = None if point is None else _pixel(point, width, height)
    rects = [r for r in (_box_pixels(b, width, height) for b in boxes) if r is not None]
    grid = None if heatmap is None else _as_grid(heatmap)

    picture = image.convert("RGB")
    if grid is not None:
        picture = _blend(picture, grid, alpha, matplotlib.colormaps[colormap])
    if label:
        picture = _draw_label(picture, label)
    draw = ImageDraw.Draw(picture)
    line = max(2, round(min(width, height) / 150))
    for rect in rects:
        draw.rectangle(rect, outline=BOX_COLOUR, width=line)  # PIL grows the outline inward
    if xy is not None:
        x, y = xy
        r = max(4, round(min(width, height) / 60))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=POINT_COLOUR, outline=POINT_OUTLINE,
                     width=max(1, r // 4))
        picture.putpixel(xy, POINT_COLOUR)  # last, so the exact pixel is red whatever the size
    return picture


def save_png(picture: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``picture`` as a PNG atomically (a crash leaves no half file); returns the path."""
    path = Path(path)
    with atomic_open(path, "wb") as handle:
        picture.save(handle, format="PNG")
    return path


def _as_grid(heatmap) -> torch.Tensor:
    """The heatmap as a 2-D float32 CPU tensor, checked (2-D, not empty, finite)."""
    if isinstance(heatmap, torch.Tensor):
        grid = heatmap.detach().to("cpu", torch.float32)
    else:
        try:
            grid = torch.as_tensor(np.asarray(heatmap, dtype=np.float32))
        except (TypeError, ValueError) as error:
            raise PictureError(f"heatmap is not numeric: {error}") from error
    if grid.ndim != 2:
        raise PictureError(f"heatmap must be 2-D [h, w], got shape {tuple(grid.shape)}; "
                           "pass one phrase's map")
    if grid.numel() == 0:
        raise PictureError(f"heatmap is empty, shape {tuple(grid.shape)}")
    if not bool(torch.isfinite(grid).all()):
        raise PictureError("heatmap has NaN or infinite values")
    return grid


def _blend(picture: Image.Image, grid: torch.Tensor, alpha: float, cmap) -> Image.Image:
    """The heatmap blended in with weight alpha*m; an all-zero map changes nothing."""
    width, height = picture.size
    full = resize_to_image(grid, width, height).clamp(min=0)
    peak = float(full.max())
    if peak <= 0:
        return picture
    m = (full / peak).numpy().astype(np.float64)
    colour = cmap(m)[..., :3] * 255.0
    weight = alpha * m[..., None]
    pixels = np.asarray(picture, dtype=np.float64)
    mixed = pixels * (1.0 - weight) + colour * weight
    return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), "RGB")


def _pixel(point, width: int, height: int) -> tuple[int, int]:
    """The point as integer (x, y) inside the image."""
    try:
        x, y = point
        xi, yi = int(x), int(y)
        integral = xi == x and yi == y
    except (TypeError, ValueError) as error:
        raise PictureError(f"point must be an (x, y) pair of integers, got {point!r}") from error
    if not integral:
        raise PictureError(f"point must be an integer pixel (x, y), got {point!r}")
    if not (0 <= xi < width and 0 <= yi < height):
        raise PictureError(f"point {(xi, yi)} is outside the {width}x{height} image "
                           f"(x in 0..{width - 1}, y in 0..{height - 1})")
    return xi, yi


def _box_pixels(box, width: int, height: int) -> list[int] | None:
    """The box's outermost scored pixels (as pointing.is_hit counts them), clipped to the image;
    None, logged, for a box wholly outside it."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError) as error:
        raise PictureError(f"box must be [x0, y0, x1, y1], got {box!r}") from error
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
        raise PictureError(f"box {box!r} is not [x0, y0, x1, y1] with x0 <= x1 and y0 <= y1")
    left, top = max(0, math.ceil(x0)), max(0, math.ceil(y0))
    right, bottom = min(width - 1, math.floor(x1)), min(height - 1, math.floor(y1))
    if right < left or bottom < top:
        logger.warning("box %r has no pixel inside the %dx%d image; not drawn", box, width, height)
        return None
    return [left, top, right, bottom]


def _draw_label(picture: Image.Image, label: str) -> Image.Image:
    """White text on a dark semi-opaque band across the top, cut with an ellipsis to fit."""
    width = picture.width
    size = max(10, round(width / 32))
    font = ImageFont.load_default(size=size)
    ellipsis = ELLIPSIS if isinstance(font, ImageFont.FreeTypeFont) else "..."  # bitmap: latin-1
    pad = max(2, size // 4)
    text = _fit(" ".join(label.split()), font, width - 2 * pad, ellipsis)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (size, 0)
    layer = Image.new("RGBA", picture.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    draw.rectangle([0, 0, width - 1, ascent + descent + 2 * pad - 1], fill=BAND_COLOUR)
    draw.text((pad, pad), text, font=font, fill=TEXT_COLOUR)
    return Image.alpha_composite(picture.convert("RGBA"), layer).convert("RGB")


def _fit(text: str, font, room: float, ellipsis: str) -> str:
    """The longest prefix of ``text`` (plus the ellipsis if cut) no wider than ``room``."""
    if font.getlength(text) <= room:
        return text
    low, high = 0, len(text)  # invariant: prefix of length `low` fits, `high` does not
    while high - low > 1:
        mid = (low + high) // 2
        if font.getlength(text[:mid].rstrip() + ellipsis) <= room:
            low = mid
        else:
            high = mid
    cut = text[:low].rstrip() + ellipsis
    return cut if font.getlength(cut) <= room else ""
