"""The hard synthetic style (``datasets synth --style hard``): where the choice of level matters.

The default style's shapes are flat-coloured, 2-20 % of the image and never touch, so every
feature level finds them and a model's level selection hardly matters. This style draws scenes in
which it does:

- **sizes from 5 % to 60 % of the image** (tight box area over image area), in three classes that
  are the phrases' ``category``: ``small`` (5-12 %), ``medium`` (12-25 %) and ``large``
  (25-60 %). A small object spans about two cells of a stride-32 map, so the coarse levels blur it
  into its neighbours while the fine ones resolve it;
- **textured fills**: every shape is filled with stripes, a checkerboard, dots, smooth noise or a
  ramp between its colour and a darker or lighter tone of it, and the background carries patches
  of the same textures in muted colours, so texture alone names nothing;
- **partial occlusion**: shapes are placed anywhere, over each other, in roughly back-to-front
  order of size; every shape keeps at least ``MIN_VISIBLE`` of its pixels visible, and its box is
  the tight box of its *visible* pixels (still at least ``MIN_BOX_AREA`` of the image, so the
  pointing game never skips it);
- **clutter not named in the caption**: 1-3 further shapes in the same saturated colours and the
  same shapes, each a (colour, shape) pair distinct from every named one (so every phrase stays
  unambiguous), which the captions never mention. A model cannot point at "the red thing" when a
  red square and a red circle are both there; it has to combine the words.

Captions are those of the default style ("a small red circle above a blue star", listings),
naming only the 2-3 named shapes; the size word, when a phrase has one, follows the size class
(``small``/``large``; medium shapes get none). Example ``i`` depends only on ``(seed, i, size)``,
as in the default style, from its own random stream: the two styles never share an image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from multigrounding.datasets.records import Phrase
from multigrounding.datasets.synth import (COLOURS, SHAPES, SynthExample, SynthSummary,
                                           _background, _caption_plans, _muted_colours, _outline,
                                           generate_synth, render_example)
from multigrounding.errors import UnknownNameError

STYLE_STREAM = 2              # third entropy word of the random stream (the default style has none)
SIZE_CLASSES: dict[str, tuple[float, float]] = {"small": (0.05, 0.12), "medium": (0.12, 0.25),
                                                "large": (0.25, 0.60)}
NAMED_CLASS_ODDS = {"small": 0.45, "medium": 0.35, "large": 0.20}
CLUTTER_CLASS_ODDS = {"small": 0.6, "medium": 0.4}
SAMPLE_MARGIN = 1.1           # sampled areas start this far above a class's floor (occlusion)
MIN_BOX_AREA = 0.05           # every named shape's visible box covers at least this much
MIN_VISIBLE = 0.6             # share of a shape's pixels that stays visible
MAX_TILT_DEGREES = 30.0
MAX_STRETCH = 0.3             # log aspect ratio in [-0.3, 0.3]
PLACEMENT_TRIES = 40
SHRINK = 0.85                 # an object without a spot tries again this much smaller
TONE_MIX = 0.3                # the texture's second tone: this far towards black or white
COLOUR_JITTER = 10.0
PIXEL_NOISE = 8.0
TEXTURES = ("stripes", "checker", "dots", "noise", "ramp")
SIZE_WORD_RATE = 0.35


@dataclass
class HardObject:
    """One shape of a hard scene; ``box`` and ``category`` are set once every shape is drawn."""

    shape: str
    colour: str
    named: bool
    mask: np.ndarray                       # [size, size] bool: the shape's own pixels
    visible: np.ndarray                    # [size, size] bool: those not covered by a later shape
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    category: str = ""

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


STYLES: tuple[str, ...] = ("default", "hard")


def generate_styled(out_dir, images: int, seed: int, *, style: str = "default", size: int = 256,
                    progress=None) -> SynthSummary:
    """``synth.generate_synth`` in the named style: ``default`` (``synth``) or ``hard`` (here)."""
    return generate_synth(out_dir, images, seed, size=size, progress=progress,
                          render=_renderer(style))


def render_styled(seed: int, index: int, size: int = 256, *, style: str = "default") -> SynthExample:
    """Example ``index`` of the run ``seed`` in the named style."""
    return _renderer(style)(seed, index, size)


def _renderer(style: str):
    if style not in STYLES:
        raise UnknownNameError("synthetic style", str(style), STYLES)
    return render_hard_example if style == "hard" else render_example


def render_hard_example(seed: int, index: int, size: int) -> SynthExample:
    """Draw hard example ``index`` of the run ``seed`` (arguments checked by the caller)."""
    rng = np.random.default_rng([seed, index, STYLE_STREAM])
    pixels, objects = draw_hard_scene(rng, size)
    named = [o for o in objects if o.named]
    captions, phrases = hard_captions(rng, named, size)
    return SynthExample(id=f"synth-hard-{seed}-{index:06d}", pixels=pixels, shapes=named,
                        captions=captions, phrases=phrases)


def draw_hard_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[HardObject]]:
    """A ``size``×``size`` RGB uint8 picture and its shapes, named ones first."""
    canvas = np.asarray(_background(rng, size), dtype=np.float32).copy()
    _texture_patches(rng, canvas, size)
    objects = _place_objects(rng, size)
    for obj in objects:                                       # back to front
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)
        colour = colour + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, 3).astype(np.float32)
        _paint_textured(rng, canvas, obj.mask, colour)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * PIXEL_NOISE
    for obj in objects:
        obj.box = tight_box(obj.visible)
        obj.category = size_class(box_area(obj.box) / (size * size))
    objects = [o for o in objects if o.named] + [o for o in objects if not o.named]
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


# ------------------------------------------------------------------------------------ geometry
def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``[x0, y0, x1, y1]`` of the True pixels, borders inclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def box_area(box: Sequence[int]) -> int:
    return (box[2] - box[0] + 1) * (box[3] - box[1] + 1)


def size_class(area_fraction: float) -> str:
    """The size class (phrase category) of a box covering ``area_fraction`` of the image."""
    for name, (_, high) in SIZE_CLASSES.items():
        if area_fraction < high:
            return name
    return "large"


def _pick(rng: np.random.Generator, odds: dict[str, float]) -> str:
    names = list(odds)
    return names[int(rng.choice(len(names), p=np.array(list(odds.values())) / sum(odds.values())))]


def _shape_points(rng: np.random.Generator, shape: str, area: float, size: int) -> np.ndarray:
    """The shape's outline, tilted and stretched, scaled so its box covers ``area`` of the image,
    at the origin (box from 0)."""
    tilt = 0.0 if shape == "circle" else math.radians(rng.uniform(-MAX_TILT_DEGREES,
                                                                  MAX_TILT_DEGREES))
    stretch = 1.0 if shape == "circle" else math.exp(rng.uniform(-MAX_STRETCH, MAX_STRETCH))
    rotation = np.array([[math.cos(tilt), -math.sin(tilt)], [math.sin(tilt), math.cos(tilt)]])
    points = (_outline(shape) * [stretch, 1.0 / stretch]) @ rotation.T
    extent = points.max(axis=0) - points.min(axis=0)
    scale = math.sqrt(area * size * size / float(extent[0] * extent[1]))
    scale = min(scale, (size - 2) / float(extent.max()))
    return (points - points.min(axis=0)) * scale


def _rasterise(points: np.ndarray, offset: tuple[int, int], size: int) -> np.ndarray:
    """The polygon ``points`` moved by ``offset`` as a [size, size] mask."""
    picture = Image.new("L", (size, size), 0)
    ImageDraw.Draw(picture).polygon([(x + offset[0], y + offset[1]) for x, y in points.tolist()],
                                    fill=255)
    return np.asarray(picture) > 0


# ----------------------------------------------------------------------------------- placement
def _kinds(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """``count`` distinct (colour, shape) pairs."""
    colour_names = list(COLOURS)
    picks = rng.choice(len(colour_names) * len(SHAPES), size=count, replace=False)
    return [(colour_names[p // len(SHAPES)], SHAPES[p % len(SHAPES)]) for p in picks]


def _place_objects(rng: np.random.Generator, size: int) -> list[HardObject]:
    """2-3 named shapes and 1-3 clutter shapes in placement (back-to-front) order, each visible
    enough."""
    while True:
        named, clutter = int(rng.integers(2, 4)), int(rng.integers(1, 4))
        kinds = _kinds(rng, named + clutter)
        plans = [(k < named, _pick(rng, NAMED_CLASS_ODDS if k < named else CLUTTER_CLASS_ODDS))
                 for k in range(named + clutter)]
        areas = [math.exp(rng.uniform(math.log(SIZE_CLASSES[c][0] * SAMPLE_MARGIN),
                                      math.log(SIZE_CLASSES[c][1]))) for _, c in plans]
        # roughly large first (at the back), with some small shapes drawn before larger ones
        order = np.argsort([-math.log(a) + rng.uniform(-0.7, 0.7) for a in areas], kind="stable")
        placed: list[HardObject] = []
        for k in order.tolist():
            is_named, _ = plans[k]
            obj = _place_one(rng, kinds[k], is_named, areas[k], placed, size)
            if obj is not None:
                placed.append(obj)
        if sum(o.named for o in placed) >= 2:
            return placed


def _place_one(rng: np.random.Generator, kind: tuple[str, str], named: bool, area: float,
               placed: list[HardObject], size: int) -> HardObject | None:
    """A spot for one shape that leaves every placed shape visible enough, shrinking if need be."""
    colour, shape = kind
    for _ in range(3):
        points = _shape_points(rng, shape, area, size)
        width, height = (int(math.ceil(v)) + 1 for v in points.max(axis=0))
        if named and width * height < MIN_BOX_AREA * size * size:
            return None                                               # shrunk too far
        for _ in range(PLACEMENT_TRIES):
            offset = (int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1)))
            mask = _rasterise(points, offset, size)
            if named and box_area(tight_box(mask)) < MIN_BOX_AREA * size * size:
                continue
            if all(_still_visible(other, mask, size) for other in placed):
                for other in placed:
                    other.visible = other.visible & ~mask
                return HardObject(shape, colour, named, mask, mask.copy())
        area *= SHRINK
    return None


def _still_visible(other: HardObject, cover: np.ndarray, size: int) -> bool:
    """Would ``other`` stay visible enough (and a named one keep a big enough box) under ``cover``?"""
    left = other.visible & ~cover
    count = int(left.sum())
    if count < MIN_VISIBLE * int(other.mask.sum()):
        return False
    return not other.named or box_area(tight_box(left)) >= MIN_BOX_AREA * size * size


# ------------------------------------------------------------------------------------ textures
def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random texture ``[height, width]`` in [0, 1]: stripes, checker, dots, noise or a ramp."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(5, 14)
        phase = (x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period
        return (np.sin(phase) > 0).astype(np.float32)
    if kind == "checker":
        cell = rng.uniform(4, 10)
        return ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    if kind == "dots":
        cell = rng.uniform(6, 12)
        dx, dy = x % cell - cell / 2, y % cell - cell / 2
        return (dx * dx + dy * dy < (cell * rng.uniform(0.2, 0.35)) ** 2).astype(np.float32)
    if kind == "noise":
        coarse = rng.random((max(2, height // 8), max(2, width // 8))).astype(np.float32)
        picture = Image.fromarray((coarse * 255).astype(np.uint8), "L")
        return np.asarray(picture.resize((width, height), Image.Resampling.BICUBIC),
                          dtype=np.float32) / 255
    angle = rng.uniform(0, 2 * math.pi)
    ramp = x * math.cos(angle) + y * math.sin(angle)
    return (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)


def _paint_textured(rng: np.random.Generator, canvas: np.ndarray, mask: np.ndarray,
                    colour: np.ndarray) -> None:
    """Fill ``mask`` with a texture between ``colour`` and a tone of it towards black or white."""
    x0, y0, x1, y1 = tight_box(mask)
    pattern = texture(rng, y1 - y0 + 1, x1 - x0 + 1)[..., None]
    target = 0.0 if float(colour.mean()) > 128 else 255.0
    tone = colour + TONE_MIX * (target - colour)
    region = canvas[y0:y1 + 1, x0:x1 + 1]
    inside = mask[y0:y1 + 1, x0:x1 + 1]
    region[inside] = (colour * (1 - pattern) + tone * pattern)[inside]


def _texture_patches(rng: np.random.Generator, canvas: np.ndarray, size: int) -> None:
    """2-5 textured rectangles and ellipses in muted colours: texture is no cue by itself."""
    count = int(rng.integers(2, 6))
    colours = _muted_colours(rng, 2 * count).astype(np.float32).reshape(count, 2, 3)
    for first, second in colours:
        width, height = (int(v) for v in rng.uniform(0.1, 0.4, 2) * size)
        x0, y0 = int(rng.integers(0, size - width)), int(rng.integers(0, size - height))
        picture = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(picture)
        if rng.random() < 0.5:
            draw.ellipse([0, 0, width - 1, height - 1], fill=255)
        else:
            draw.rectangle([0, 0, width - 1, height - 1], fill=255)
        inside = np.asarray(picture) > 0
        pattern = texture(rng, height, width)[..., None]
        region = canvas[y0:y0 + height, x0:x0 + width]
        region[inside] = (first * (1 - pattern) + second * pattern)[inside]


# ------------------------------------------------------------------------------------ captions
def hard_captions(rng: np.random.Generator, named: Sequence[HardObject],
                  size: int) -> tuple[list[str], list[Phrase]]:
    """The default style's captions over the named shapes; category = size class."""
    plans = _caption_plans(rng, named, size)
    captions: list[str] = []
    phrases: list[Phrase] = []
    for number in rng.permutation(len(plans)):
        words: list[str] = []
        for part in plans[number]:
            if isinstance(part, str):
                words.extend(part.split())
                continue
            obj = named[part]
            text = _phrase_text(rng, obj)
            phrases.append(Phrase(text=text, boxes=[list(obj.box)], caption=len(captions),
                                  start=len(words), category=obj.category))
            words.extend(text.split())
        captions.append(" ".join(words))
    return captions, phrases


def _phrase_text(rng: np.random.Generator, obj: HardObject) -> str:
    """"a red circle", sometimes "a small red circle" / "a large red circle" (not for medium)."""
    words = [obj.colour, obj.shape]
    if obj.category != "medium" and rng.random() < SIZE_WORD_RATE:
        words.insert(0, obj.category)
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])
