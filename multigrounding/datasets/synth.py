"""A synthetic grounding dataset: coloured shapes on cluttered backgrounds, captions and boxes.

Real grounding datasets cannot be downloaded everywhere (tests, CI, the offline demo), yet every
stage after the readers needs images, captions and boxed phrases. This module draws them: 2-4
shapes, each a distinct (colour, shape), spread over the whole image on a textured, noisy
background in muted colours; captions that name the shapes and say where they are relative to
each other; and, for every mention, the shape's tight box. The names are unambiguous and the
positions vary, so a model that learns grounding from the captions alone beats a centre-point
baseline by far in the pointing game, and one that has not learnt it does not.

Image ``i`` depends only on ``(seed, i, size)``: runs are reproducible byte for byte and a small
run is the prefix of a larger one.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from multigrounding.datasets.manifest import write_manifest
from multigrounding.datasets.records import Phrase, Record

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")

# Saturated and at least ~80 apart from each other in RGB, so they stay distinct after JPEG and
# noise; the background uses only muted colours far from all of them.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 80, 215),
    "yellow": (240, 215, 40),
    "purple": (145, 50, 180),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

# Side of a shape as a fraction of the image side, by the size word its phrase may use.
SIDE_FRACTIONS: dict[str, tuple[float, float]] = {"small": (0.15, 0.25), "large": (0.30, 0.45)}

RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
RELATION_TEMPLATES: tuple[str, ...] = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}")
LIST_TEMPLATES: tuple[str, ...] = ("{list}", "there is {list}", "an image of {list}",
                                   "a picture with {list}")

MIN_SIZE = 64
JPEG_QUALITY = 90
MAX_BOX_IOU = 0.1          # boxes of two shapes in one image overlap less than this
SHAPE_GAP = 2              # pixels kept free around every shape, so no shape touches another
LARGE_RATE = 0.4           # chance that a shape is drawn large
SIZE_WORD_RATE = 0.35      # chance that a phrase says "small" or "large"
THIRD_CAPTION_RATE = 0.5   # chance of a third caption
MIN_RELATION_SHIFT = 0.1   # centres this far apart (fraction of the side) for a relation
MAX_TILT_DEGREES = 12.0
PLACEMENT_TRIES = 60
COLOUR_JITTER = 10.0       # per-shape colour change, per channel
PIXEL_NOISE = 7.0          # standard deviation of the per-pixel noise over the whole image
MUTED_GREY = (70.0, 180.0)
MUTED_TINT = 20.0
MUTED_RANGE = (60.0, 195.0)


@dataclass
class SynthSummary:
    """What ``generate_synth`` wrote and how long it took."""

    images: int
    captions: int
    phrases: int
    manifest: Path
    seconds: float


@dataclass
class PlacedShape:
    """One drawn shape: its names, its tight box (pixels, borders inclusive) and its mask."""

    shape: str
    colour: str
    size_word: str
    box: tuple[int, int, int, int]
    mask: np.ndarray

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class SynthExample:
    """One generated image in memory, before it is written."""

    id: str
    pixels: np.ndarray
    shapes: list[PlacedShape]
    captions: list[str]
    phrases: list[Phrase]


def generate_synth(out_dir: str | os.PathLike, images: int, seed: int, *, size: int = 256,
                   progress: Callable[[int], None] | None = None,
                   render: Callable[[int, int, int], SynthExample] | None = None) -> SynthSummary:
    """Write ``images`` synthetic examples to ``out_dir/images/`` and ``out_dir/manifest.jsonl``.

    Images are written first and the manifest last (atomically), so a manifest on disk always
    lists complete images. ``progress(n)`` is told after every ``n`` finished images.
    ``render(seed, index, size)`` draws an example (default: ``render_example``; another style
    passes its own: ``synth_hard.generate_styled``).
    """
    _check_arguments(images, seed, size)
    started = time.perf_counter()
    out_dir = Path(out_dir)
    image_dir = out_dir.resolve() / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index in range(images):
        example = (render or render_example)(seed, index, size)
        image_path = image_dir / f"{example.id}.jpg"
        save_jpeg(example.pixels, image_path)
        records.append(Record(id=example.id, image=str(image_path), captions=example.captions,
                              phrases=example.phrases, width=size, height=size))
        if progress is not None:
            progress(1)
    manifest = out_dir / "manifest.jsonl"
    write_manifest(records, manifest)
    return SynthSummary(images=len(records), captions=sum(len(r.captions) for r in records),
                        phrases=sum(len(r.phrases) for r in records), manifest=manifest,
                        seconds=time.perf_counter() - started)


def render_example(seed: int, index: int, size: int = 256) -> SynthExample:
    """Draw example ``index`` of the run ``seed``; it depends on nothing else but ``size``."""
    _check_arguments(1, seed, size)
    rng = np.random.default_rng([seed, index])
    pixels, shapes = draw_scene(rng, size)
    captions, phrases = write_captions(rng, shapes, size)
    return SynthExample(id=f"synth-{seed}-{index:06d}", pixels=pixels, shapes=shapes,
                        captions=captions, phrases=phrases)


def save_jpeg(pixels: np.ndarray, path: Path) -> None:
    """Save an RGB array as a JPEG of quality 90 without chroma subsampling (crisper colours)."""
    Image.fromarray(pixels, "RGB").save(path, "JPEG", quality=JPEG_QUALITY, subsampling=0)


def _check_arguments(images: int, seed: int, size: int) -> None:
    """Raise ValueError naming the first bad argument."""
    for name, value in (("images", images), ("seed", seed), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if images < 1:
        raise ValueError(f"images must be at least 1, got {images}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels, got {size}")


# ---------------------------------------------------------------------------------------------
# Drawing


def draw_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[PlacedShape]]:
    """A ``size``×``size`` RGB uint8 picture and the shapes drawn on it."""
    canvas = np.asarray(_background(rng, size), dtype=np.float32).copy()
    shapes = _place_shapes(rng, size)
    for shape in shapes:
        _paint_shape(rng, canvas, shape)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * PIXEL_NOISE
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), shapes


def _muted_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` low-saturation mid-brightness colours, far from every shape colour."""
    grey = rng.uniform(*MUTED_GREY, size=(count, 1))
    tint = rng.uniform(-MUTED_TINT, MUTED_TINT, size=(count, 3))
    return np.clip(grey + tint, *MUTED_RANGE).astype(np.uint8)


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A low-frequency colour gradient with random stripes and blobs in muted colours."""
    coarse = _muted_colours(rng, 9).reshape(3, 3, 3)
    picture = Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(picture)
    _draw_stripes(rng, draw, size)
    _draw_blobs(rng, draw, size)
    return picture


def _draw_stripes(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Straight lines across the image at random angles and widths."""
    count = int(rng.integers(2, 9))
    colours = _muted_colours(rng, count)
    for colour in colours:
        x, y = rng.uniform(0, size, 2)
        angle = rng.uniform(0, math.pi)
        dx, dy = math.cos(angle) * size * 1.5, math.sin(angle) * size * 1.5
        width = int(rng.integers(2, max(3, size // 32) + 1))
        draw.line([(x - dx, y - dy), (x + dx, y + dy)], fill=tuple(int(c) for c in colour),
                  width=width)


def _draw_blobs(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """Ellipses and irregular polygons, shape-like clutter that is not a named shape."""
    count = int(rng.integers(2, 7))
    colours = _muted_colours(rng, count)
    for colour in colours:
        fill = tuple(int(c) for c in colour)
        cx, cy = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(0.04, 0.15, 2) * size
        if rng.random() < 0.5:
            draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=fill)
        else:
            corners = int(rng.integers(3, 8))
            angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
            radii = rng.uniform(0.5, 1.0, corners)
            draw.polygon([(cx + rx * r * math.cos(a), cy + ry * r * math.sin(a))
                          for a, r in zip(angles, radii)], fill=fill)


def _paint_shape(rng: np.random.Generator, canvas: np.ndarray, shape: PlacedShape) -> None:
    """Fill the shape's mask with its colour, slightly jittered."""
    colour = np.asarray(COLOURS[shape.colour], dtype=np.float32)
    colour = colour + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3).astype(np.float32)
    x0, y0, x1, y1 = shape.box
    canvas[y0:y1 + 1, x0:x1 + 1][shape.mask] = colour


def _outline(shape: str) -> np.ndarray:
    """The shape's corners, ``(n, 2)``, centred on 0 and spanning about [-1, 1]."""
    if shape == "circle":
        return _regular_polygon(64, 1.0, 0.0)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    if shape == "diamond":
        return np.array([[0, -1], [0.7, 0], [0, 1], [-0.7, 0]], dtype=float)
    if shape == "triangle":
        return np.array([[0, -1], [0.95, 0.75], [-0.95, 0.75]], dtype=float)
    if shape == "hexagon":
        return _regular_polygon(6, 1.0, 0.0)
    if shape == "star":
        outer = _regular_polygon(5, 1.0, -math.pi / 2)
        inner = _regular_polygon(5, 0.42, -math.pi / 2 + math.pi / 5)
        return np.stack([outer, inner], axis=1).reshape(10, 2)
    if shape == "cross":
        t = 0.33
        return np.array([[-t, -1], [t, -1], [t, -t], [1, -t], [1, t], [t, t], [t, 1], [-t, 1],
                         [-t, t], [-1, t], [-1, -t], [-t, -t]], dtype=float)
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def _regular_polygon(corners: int, radius: float, first_angle: float) -> np.ndarray:
    """Corners of a regular polygon of the given radius."""
    angles = first_angle + np.arange(corners) * 2 * math.pi / corners
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _shape_mask(rng: np.random.Generator, shape: str, size_word: str, size: int) -> np.ndarray:
    """The shape rasterised at a random side and tilt, cropped to its tight bounding box."""
    low, high = SIDE_FRACTIONS[size_word]
    half_side = rng.uniform(low, high) * size / 2
    tilt = 0.0 if shape == "circle" else math.radians(rng.uniform(-MAX_TILT_DEGREES,
                                                                  MAX_TILT_DEGREES))
    rotation = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
    canvas_side = int(math.ceil(half_side * 3)) + 4
    points = _outline(shape) @ rotation.T * half_side + canvas_side / 2
    picture = Image.new("L", (canvas_side, canvas_side), 0)
    ImageDraw.Draw(picture).polygon([tuple(p) for p in points.tolist()], fill=255)
    left, top, right, bottom = picture.getbbox()
    return np.asarray(picture)[top:bottom, left:right] > 0


def _place_shapes(rng: np.random.Generator, size: int) -> list[PlacedShape]:
    """2-4 shapes of distinct (colour, shape), placed anywhere, apart from each other."""
    while True:
        count = int(rng.integers(2, 5))
        kinds = _distinct_kinds(rng, count)
        large = rng.random(count) < LARGE_RATE
        order = sorted(range(count), key=lambda k: not large[k])  # large ones first
        occupied = np.zeros((size + 2 * SHAPE_GAP, size + 2 * SHAPE_GAP), dtype=bool)
        placed: list[PlacedShape] = []
        for k in order:
            colour, shape = kinds[k]
            for size_word in (("large", "small") if large[k] else ("small",)):
                mask = _shape_mask(rng, shape, size_word, size)
                box = _find_spot(rng, mask, placed, occupied, size)
                if box is not None:
                    placed.append(PlacedShape(shape, colour, size_word, box, mask))
                    _mark_occupied(occupied, mask, box)
                    break
        if len(placed) >= 2:
            return placed


def _distinct_kinds(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """``count`` different (colour, shape) pairs."""
    colour_names = list(COLOURS)
    picks = rng.choice(len(colour_names) * len(SHAPES), size=count, replace=False)
    return [(colour_names[p // len(SHAPES)], SHAPES[p % len(SHAPES)]) for p in picks]


def _find_spot(rng: np.random.Generator, mask: np.ndarray, placed: Sequence[PlacedShape],
               occupied: np.ndarray, size: int) -> tuple[int, int, int, int] | None:
    """A random box for ``mask`` inside the image that keeps clear of the placed shapes."""
    height, width = mask.shape
    for _ in range(PLACEMENT_TRIES):
        x0 = int(rng.integers(0, size - width + 1))
        y0 = int(rng.integers(0, size - height + 1))
        box = (x0, y0, x0 + width - 1, y0 + height - 1)
        if any(box_iou(box, other.box) >= MAX_BOX_IOU for other in placed):
            continue
        window = occupied[y0 + SHAPE_GAP:y0 + SHAPE_GAP + height,
                          x0 + SHAPE_GAP:x0 + SHAPE_GAP + width]
        if not (window & mask).any():
            return box
    return None


def _mark_occupied(occupied: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int]) -> None:
    """Add the mask, grown by SHAPE_GAP pixels, to the occupancy map (padded by SHAPE_GAP)."""
    height, width = mask.shape
    reach = 2 * SHAPE_GAP + 1
    grown = np.zeros((height + reach - 1, width + reach - 1), dtype=bool)
    for dy in range(reach):
        for dx in range(reach):
            grown[dy:dy + height, dx:dx + width] |= mask
    x0, y0 = box[0], box[1]
    occupied[y0:y0 + grown.shape[0], x0:x0 + grown.shape[1]] |= grown


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two pixel boxes with inclusive borders."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return ix * iy / (area_a + area_b - ix * iy)


# ---------------------------------------------------------------------------------------------
# Captions

# A caption plan is a list of template words and shape indices; each index becomes a phrase.
CaptionPlan = list[str | int]


def write_captions(rng: np.random.Generator, shapes: Sequence[PlacedShape],
                   size: int) -> tuple[list[str], list[Phrase]]:
    """2-3 captions (relations and a listing) and a phrase for every shape they mention."""
    plans = _caption_plans(rng, shapes, size)
    captions: list[str] = []
    phrases: list[Phrase] = []
    for number in rng.permutation(len(plans)):
        text, mentions = _compose(rng, plans[number], shapes)
        for index, phrase_text, start in mentions:
            shape = shapes[index]
            phrases.append(Phrase(text=phrase_text, boxes=[list(shape.box)],
                                  caption=len(captions), start=start, category=shape.shape))
        captions.append(text)
    return captions, phrases


def _caption_plans(rng: np.random.Generator, shapes: Sequence[PlacedShape],
                   size: int) -> list[CaptionPlan]:
    """One listing of all shapes, then relations between different pairs (or another listing)."""
    wanted = 3 if rng.random() < THIRD_CAPTION_RATE else 2
    pairs = _related_pairs(rng, shapes, size)
    plans = [_listing_plan(rng, len(shapes))]
    while len(plans) < wanted:
        if pairs:
            plans.append(_relation_plan(rng, *pairs.pop(0)))
        else:
            plans.append(_listing_plan(rng, len(shapes)))
    return plans


def _related_pairs(rng: np.random.Generator, shapes: Sequence[PlacedShape],
                   size: int) -> list[tuple[int, str, int]]:
    """``(a, relation, b)`` for every pair clearly apart, in random order and orientation."""
    pairs = []
    for a in range(len(shapes)):
        for b in range(a + 1, len(shapes)):
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            relation = spatial_relation(shapes[first].centre, shapes[second].centre, size)
            if relation is not None:
                pairs.append((first, relation, second))
    return [pairs[k] for k in rng.permutation(len(pairs))]


def spatial_relation(a: tuple[float, float], b: tuple[float, float], size: int) -> str | None:
    """Where centre ``a`` is from centre ``b`` along the axis they differ most, or None if close."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if max(abs(dx), abs(dy)) < MIN_RELATION_SHIFT * size:
        return None
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def _relation_plan(rng: np.random.Generator, a: int, relation: str, b: int) -> CaptionPlan:
    """E.g. ``[0, "above", 2]`` from a random relation template."""
    template = RELATION_TEMPLATES[int(rng.integers(len(RELATION_TEMPLATES)))]
    slots: dict[str, list[str | int]] = {"{a}": [a], "{b}": [b], "{rel}": [relation]}
    return [part for word in template.split() for part in slots.get(word, [word])]


def _listing_plan(rng: np.random.Generator, count: int) -> CaptionPlan:
    """All shapes in random order, "and" before the last, in a random listing template."""
    order = [int(k) for k in rng.permutation(count)]
    listing: list[str | int] = [*order[:-1], "and", order[-1]]
    template = LIST_TEMPLATES[int(rng.integers(len(LIST_TEMPLATES)))]
    return [part for word in template.split()
            for part in (listing if word == "{list}" else [word])]


def _compose(rng: np.random.Generator, plan: CaptionPlan,
             shapes: Sequence[PlacedShape]) -> tuple[str, list[tuple[int, str, int]]]:
    """The caption text and ``(shape index, phrase text, first word index)`` per mention."""
    words: list[str] = []
    mentions: list[tuple[int, str, int]] = []
    for part in plan:
        if isinstance(part, str):
            words.extend(part.split())
            continue
        text = phrase_text(rng, shapes[part])
        mentions.append((part, text, len(words)))
        words.extend(text.split())
    return " ".join(words), mentions


def phrase_text(rng: np.random.Generator, shape: PlacedShape) -> str:
    """"a red circle", "an orange star", sometimes with the size: "a small blue square"."""
    words = [shape.colour, shape.shape]
    if rng.random() < SIZE_WORD_RATE:
        words.insert(0, shape.size_word)
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])
