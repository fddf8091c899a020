"""The synthetic grounding dataset: reproducible, well formed, and its boxes and words are true."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multigrounding.datasets.manifest import read_manifest
from multigrounding.datasets.records import Record, check_record
from multigrounding.datasets.synth import (COLOURS, RELATIONS, SHAPES, box_iou, generate_synth,
                                           render_example, save_jpeg)
from multigrounding.datasets.synth_hard import (MIN_VISIBLE, PIXEL_NOISE, SIZE_CLASSES, STYLE_STREAM,
                                                generate_styled, render_styled,
                                                TONE_MIX, draw_hard_scene, tight_box)
from multigrounding.errors import UnknownNameError

SIZE = 128
NEAR_COLOUR = 40.0  # RGB distance within which a decoded pixel counts as the shape's colour


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[Record]]:
    """60 images at 128 px, read back from the manifest."""
    out = tmp_path_factory.mktemp("synth")
    summary = generate_synth(out, 60, 7, size=SIZE)
    return out, list(read_manifest(summary.manifest))


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def colour_and_shape(phrase_text: str) -> tuple[str, str]:
    *_, colour, shape = phrase_text.split()
    return colour, shape


def decode(record: Record) -> np.ndarray:
    with Image.open(record.image) as image:
        assert image.format == "JPEG"
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def distinct_shapes(record: Record) -> dict[tuple[str, str], list[int]]:
    """(colour, shape) → its box, from the phrases (every mention of a shape has one box)."""
    shapes: dict[tuple[str, str], list[int]] = {}
    for phrase in record.phrases:
        box = [int(v) for v in phrase.boxes[0]]
        assert shapes.setdefault(colour_and_shape(phrase.text), box) == box
    return shapes


# --- determinism -------------------------------------------------------------------------------

def test_same_seed_gives_identical_files(tmp_path):
    first = generate_synth(tmp_path / "a", 6, 3, size=96)
    generate_synth(tmp_path / "b", 6, 3, size=96)
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    assert sorted(a) == ["images/synth-3-%06d.jpg" % i for i in range(6)] + ["manifest.jsonl"]
    assert a == b
    assert (first.images, first.manifest) == (6, tmp_path / "a" / "manifest.jsonl")


def test_other_seed_gives_other_images(tmp_path):
    generate_synth(tmp_path / "a", 3, 3, size=96)
    generate_synth(tmp_path / "b", 3, 4, size=96)
    a = [p.read_bytes() for p in sorted((tmp_path / "a" / "images").iterdir())]
    b = [p.read_bytes() for p in sorted((tmp_path / "b" / "images").iterdir())]
    assert all(x != y for x, y in zip(a, b))
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() != \
        (tmp_path / "b" / "manifest.jsonl").read_bytes()


def test_small_run_is_prefix_of_larger_run(tmp_path):
    generate_synth(tmp_path / "small", 3, 5, size=96)
    generate_synth(tmp_path / "large", 8, 5, size=96)
    small, large = file_bytes(tmp_path / "small"), file_bytes(tmp_path / "large")
    for name, data in small.items():
        if name.startswith("images/"):
            assert large[name] == data
    small_lines = small["manifest.jsonl"].splitlines()
    assert small_lines == large["manifest.jsonl"].splitlines()[:3]


# --- well formed -------------------------------------------------------------------------------

def test_manifest_lines_are_relative_and_records_check(run):
    out, records = run
    lines = (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records) == 60
    for index, (line, record) in enumerate(zip(lines, records)):
        assert json.loads(line)["image"] == f"images/synth-7-{index:06d}.jpg"
        assert record.id == f"synth-7-{index:06d}"
        assert (record.width, record.height) == (SIZE, SIZE)
        assert list(check_record(record)) == []
        assert 2 <= len(record.captions) <= 3
        assert 2 <= len(distinct_shapes(record)) <= 4


def test_images_decode_at_declared_size(run):
    _, records = run
    for record in records:
        assert decode(record).shape == (record.height, record.width, 3)


def test_captions_are_lowercase_words_and_phrases_match(run):
    _, records = run
    for record in records:
        for caption in record.captions:
            assert all(word.isalpha() and word.islower() for word in caption.split()), caption
        for phrase in record.phrases:
            words = record.captions[phrase.caption].split()
            assert words[phrase.start:phrase.start + len(phrase.words)] == phrase.words
            article, *adjectives, colour, shape = phrase.words
            assert article == ("an" if (adjectives or [colour])[0][0] in "aeiou" else "a")
            assert adjectives in ([], ["small"], ["large"])
            assert colour in COLOURS and shape in SHAPES and phrase.category == shape


def test_every_shape_mentioned_and_shapes_distinct_and_apart(run):
    _, records = run
    for record in records:
        shapes = distinct_shapes(record)
        mentioned_in = {colour_and_shape(p.text): set() for p in record.phrases}
        for phrase in record.phrases:
            mentioned_in[colour_and_shape(phrase.text)].add(phrase.caption)
        listing = set.intersection(*mentioned_in.values())
        assert listing, "one caption lists every shape"
        boxes = list(shapes.values())
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert box_iou(boxes[i], boxes[j]) < 0.1


# --- the boxes and words are true -----------------------------------------------------------

def test_boxes_are_tight_around_their_colour(run):
    """The declared box equals, to 2 px, the box of the pixels of the shape's colour near it."""
    _, records = run
    for record in records:
        pixels = decode(record)
        shapes = distinct_shapes(record)
        for (colour, shape), box in shapes.items():
            x0, y0, x1, y1 = box
            near = np.linalg.norm(pixels - np.array(COLOURS[colour]), axis=2) < NEAR_COLOUR
            mine = np.zeros_like(near)
            mine[y0:y1 + 1, x0:x1 + 1] = True
            for other in shapes.values():
                if other is not box:
                    near[other[1]:other[3] + 1, other[0]:other[2] + 1] &= \
                        mine[other[1]:other[3] + 1, other[0]:other[2] + 1]
            margin = 6
            wx0, wy0 = max(x0 - margin, 0), max(y0 - margin, 0)
            window = near[wy0:y1 + margin + 1, wx0:x1 + margin + 1]
            ys, xs = np.nonzero(window)
            found = [xs.min() + wx0, ys.min() + wy0, xs.max() + wx0, ys.max() + wy0]
            assert np.abs(np.array(found) - np.array(box)).max() <= 2, (record.id, colour, shape,
                                                                        box, found)
            assert near[y0:y1 + 1, x0:x1 + 1].mean() > 0.25  # the shape fills much of its box


def test_shifted_boxes_would_fail_the_tightness_check(run):
    """Guard for the test above: a box moved by 5 px no longer matches the coloured pixels."""
    _, records = run
    record = records[0]
    pixels = decode(record)
    (colour, _), box = next(iter(distinct_shapes(record).items()))
    near = np.linalg.norm(pixels - np.array(COLOURS[colour]), axis=2) < NEAR_COLOUR
    x0, y0, x1, y1 = box
    inside = near[y0:y1 + 1, x0:x1 + 1].sum()
    for dx, dy in ((5, 0), (-5, 0), (0, 5), (0, -5)):
        sx0, sy0 = max(x0 + dx, 0), max(y0 + dy, 0)
        shifted = near[sy0:y1 + dy + 1, sx0:x1 + dx + 1].sum()
        assert shifted < inside


def test_relation_words_agree_with_box_centres(run):
    _, records = run
    checked = 0
    for record in records:
        for number, caption in enumerate(record.captions):
            mentions = sorted((p for p in record.phrases if p.caption == number),
                              key=lambda p: p.start)
            words = caption.split()
            if len(mentions) != 2:
                continue
            first, second = mentions
            between = words[first.start + len(first.words):second.start]
            if between[:1] == ["is"]:
                between = between[1:]
            relation = " ".join(between)
            if relation == "and":
                continue
            assert relation in RELATIONS, caption
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = first.boxes[0], second.boxes[0]
            dx, dy = (ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2
            expected = {"above": dy < 0 and abs(dy) >= abs(dx),
                        "below": dy > 0 and abs(dy) >= abs(dx),
                        "to the left of": dx < 0 and abs(dx) > abs(dy),
                        "to the right of": dx > 0 and abs(dx) > abs(dy)}[relation]
            assert expected, (record.id, caption, first.boxes, second.boxes)
            checked += 1
    assert checked >= 40


def test_size_words_agree_with_box_sizes(run):
    _, records = run
    sides: dict[str, list[float]] = {"small": [], "large": []}
    for record in records:
        for phrase in record.phrases:
            if phrase.words[1] in sides:
                x0, y0, x1, y1 = phrase.boxes[0]
                sides[phrase.words[1]].append(max(x1 - x0 + 1, y1 - y0 + 1) / SIZE)
    assert sides["small"] and sides["large"]
    assert max(sides["small"]) <= 0.3 and min(sides["large"]) >= 0.25
    assert np.mean(sides["small"]) + 0.1 < np.mean(sides["large"])


# --- variety -----------------------------------------------------------------------------------

def test_variety_of_shapes_colours_relations_and_places(run):
    _, records = run
    shapes, colours, quadrants, relations = set(), set(), set(), set()
    for record in records:
        for (colour, shape), (x0, y0, x1, y1) in distinct_shapes(record).items():
            shapes.add(shape)
            colours.add(colour)
            quadrants.add(((x0 + x1) / 2 >= SIZE / 2, (y0 + y1) / 2 >= SIZE / 2))
        for caption in record.captions:
            relations.update(r for r in RELATIONS if f" {r} " in caption)
    assert shapes == set(SHAPES)
    assert colours == set(COLOURS)
    assert len(quadrants) == 4
    assert relations == set(RELATIONS)
    centre_x = [(p.boxes[0][0] + p.boxes[0][2]) / 2 for r in records for p in r.phrases]
    assert np.std(centre_x) > SIZE / 6  # spread over the image, not gathered in the middle


def test_colours_stay_distinct():
    palette = np.array(list(COLOURS.values()), dtype=float)
    distances = np.linalg.norm(palette[:, None] - palette[None], axis=2)
    assert distances[~np.eye(len(palette), dtype=bool)].min() > 2 * NEAR_COLOUR


def test_render_example_matches_written_record(tmp_path):
    generate_synth(tmp_path, 2, 11, size=96)
    record = list(read_manifest(tmp_path / "manifest.jsonl"))[1]
    example = render_example(11, 1, 96)
    assert example.id == record.id and example.captions == record.captions
    assert [p.to_json() for p in example.phrases] == [p.to_json() for p in record.phrases]
    save_jpeg(example.pixels, tmp_path / "again.jpg")
    assert (tmp_path / "again.jpg").read_bytes() == Path(record.image).read_bytes()


# --- arguments and progress ---------------------------------------------------------------------

def test_progress_counts_every_image(tmp_path):
    counts: list[int] = []
    summary = generate_synth(tmp_path, 4, 0, size=64, progress=counts.append)
    assert sum(counts) == summary.images == 4
    records = list(read_manifest(summary.manifest))
    assert summary.captions == sum(len(r.captions) for r in records)
    assert summary.phrases == sum(len(r.phrases) for r in records)
    assert summary.seconds > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"images": 0}, "images must be at least 1"),
    ({"images": -3}, "images must be at least 1"),
    ({"size": 63}, "size must be at least 64"),
    ({"seed": -1}, "seed must be a non-negative"),
    ({"images": 2.5}, "images must be an integer"),
    ({"size": True}, "size must be an integer"),
])
def test_bad_arguments_raise_value_error(tmp_path, kwargs, message):
    arguments = {"images": 2, "seed": 0, "size": 64, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_synth(tmp_path / "out", arguments.pop("images"), arguments.pop("seed"),
                       **arguments)
    assert not (tmp_path / "out").exists()


# --- the default style is today's, byte for byte ----------------------------------------------

# sha256 over (pixels, id, captions, phrases) of 15 default-style examples, computed with the
# generator as it was before the hard style existed; any change to the default style breaks it.
DEFAULT_STYLE_SHA256 = "589034a4091d6dcd2cd38265aad4f8c3c598112270aa21cd906b055a997c46da"


def test_default_style_is_unchanged():
    for render in (render_example, render_styled):
        digest = hashlib.sha256()
        for seed, size in ((3, 96), (7, 128), (0, 256)):
            for index in range(5):
                example = render(seed, index, size)
                digest.update(example.pixels.tobytes())
                digest.update(json.dumps([example.id, example.captions,
                                          [p.to_json() for p in example.phrases]]).encode())
        assert digest.hexdigest() == DEFAULT_STYLE_SHA256


def test_unknown_style_is_refused(tmp_path):
    with pytest.raises(UnknownNameError, match="Did you mean 'hard'"):
        generate_styled(tmp_path / "out", 2, 0, style="harder")
    assert not (tmp_path / "out").exists()


# --- the hard style ------------------------------------------------------------------------------

HARD_SIZE = 160


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory) -> tuple[Path, list[Record]]:
    out = tmp_path_factory.mktemp("synth-hard")
    summary = generate_styled(out, 40, 5, size=HARD_SIZE, style="hard")
    return out, list(read_manifest(summary.manifest))


def hard_scenes(seed: int, count: int, size: int):
    """The drawn scenes (every shape, clutter included) behind the hard examples of ``seed``."""
    for index in range(count):
        rng = np.random.default_rng([seed, index, STYLE_STREAM])
        yield draw_hard_scene(rng, size)


def test_hard_style_is_deterministic_and_its_own_stream(tmp_path):
    generate_styled(tmp_path / "a", 4, 3, size=96, style="hard")
    generate_styled(tmp_path / "b", 4, 3, size=96, style="hard")
    generate_styled(tmp_path / "c", 6, 3, size=96, style="hard")
    generate_styled(tmp_path / "d", 4, 4, size=96, style="hard")
    generate_synth(tmp_path / "e", 4, 3, size=96)
    a, b, c = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b"), file_bytes(tmp_path / "c")
    assert a == b
    assert sorted(a) == ["images/synth-hard-3-%06d.jpg" % i for i in range(4)] + ["manifest.jsonl"]
    assert all(c[name] == data for name, data in a.items() if name.startswith("images/"))
    other_seed = file_bytes(tmp_path / "d")
    default = [p.read_bytes() for p in sorted((tmp_path / "e" / "images").iterdir())]
    for index, name in enumerate(sorted(n for n in a if n.startswith("images/"))):
        assert a[name] != other_seed[name.replace("-3-", "-4-")] and a[name] != default[index]


def test_hard_records_check_and_phrases_are_the_named_shapes(hard_run):
    _, records = hard_run
    for record in records:
        assert list(check_record(record)) == []
        assert 2 <= len(distinct_shapes(record)) <= 3
        for phrase in record.phrases:
            words = record.captions[phrase.caption].split()
            assert words[phrase.start:phrase.start + len(phrase.words)] == phrase.words
            article, *adjectives, colour, shape = phrase.words
            assert colour in COLOURS and shape in SHAPES
            assert adjectives in ([], [phrase.category]) and phrase.category in SIZE_CLASSES


def test_hard_sizes_span_five_to_sixty_percent_and_categories_are_size_classes(hard_run):
    _, records = hard_run
    fractions = []
    for record in records:
        for phrase in record.phrases:
            x0, y0, x1, y1 = phrase.boxes[0]
            fraction = (x1 - x0 + 1) * (y1 - y0 + 1) / HARD_SIZE ** 2
            low, high = SIZE_CLASSES[phrase.category]
            assert low <= fraction < high or (phrase.category == "large" and fraction <= 0.7)
            fractions.append(fraction)
    assert min(fractions) >= 0.05 and max(fractions) <= 0.7
    assert min(fractions) < 0.08 and max(fractions) > 0.35
    categories = {p.category for r in records for p in r.phrases}
    assert categories == set(SIZE_CLASSES)


def test_hard_boxes_are_the_visible_pixels_and_show_the_shapes_colour():
    """Each shape's box is the tight box of its visible pixels, and those drawn pixels lie near the
    segment between its colour and its texture's tone: the visibility bookkeeping matches what
    was painted on top of what."""
    for pixels, objects in hard_scenes(5, 12, HARD_SIZE):
        for obj in objects:
            assert obj.box == tight_box(obj.visible)
            colour = np.array(COLOURS[obj.colour], dtype=float)
            tone = colour + TONE_MIX * ((0.0 if colour.mean() > 128 else 255.0) - colour)
            seen = pixels[obj.visible].astype(float)
            along = np.clip(((seen - colour) @ (tone - colour)) / ((tone - colour) @ (tone - colour)), 0, 1)
            distance = np.linalg.norm(seen - (colour + along[:, None] * (tone - colour)), axis=1)
            assert np.mean(distance < 45) > 0.95, (obj.colour, obj.shape)


def test_hard_shapes_are_partly_occluded_textured_and_among_unnamed_clutter(hard_run):
    _, records = hard_run
    occluded = textured = scenes = 0
    for (pixels, objects), record in zip(hard_scenes(5, len(records), HARD_SIZE), records):
        scenes += 1
        named = {(o.colour, o.shape) for o in objects if o.named}
        clutter = {(o.colour, o.shape) for o in objects if not o.named}
        assert set(distinct_shapes(record)) == named
        assert 1 <= len(clutter) <= 3 and not named & clutter
        for caption in record.captions:
            for colour, shape in clutter:
                assert f"{colour} {shape}" not in caption
        for obj in objects:
            visible, whole = int(obj.visible.sum()), int(obj.mask.sum())
            assert visible >= MIN_VISIBLE * whole
            occluded += visible < whole
            textured += float(pixels[obj.visible].astype(float).std(axis=0).max()) > 2 * PIXEL_NOISE
    assert occluded >= scenes // 2           # occlusion is common, not a rare accident
    assert textured >= 0.6 * scenes * 2      # most shapes carry a visible texture
