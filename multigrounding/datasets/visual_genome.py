"""Visual Genome region descriptions as manifest records: every region phrase is a boxed query.

``region_descriptions.json`` is over 1 GB, so it is streamed one image at a time with ijson and
memory holds only the image sizes from ``image_data.json``. As in the reference preprocessing,
boxes are clamped to the image and identical phrases of one image become one query with all
their boxes. The reference split (``data_splits.pickle``) is loaded with the safe unpickler.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

from multigrounding.datasets.jsonstream import stream_items
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import Phrase, Record, is_int, is_number
from multigrounding.datasets.safe_pickle import load_pickle
from multigrounding.errors import DatasetError, DatasetNotFoundError

REGIONS = "Visual Genome region descriptions file"
IMAGE_DATA = "Visual Genome image data file"
SPLIT_EXPECTED = "a dict {'train': set of image ids, 'test': set of image ids}"

# What is kept of an image_data.json entry: (width, height, where the image is). ``where`` is the
# URL's folder (``VG_100K_2``) when the file is ``<id>.jpg`` in it, else ``folder/name``, or None.
# Equal tuples are shared, so the table costs little more than its keys.
ImageInfo = tuple[int, int, str | None]


def read_visual_genome(regions_json: str | os.PathLike, image_data_json: str | os.PathLike,
                       image_dir: str | os.PathLike, split_pickle: str | os.PathLike | None = None,
                       *, split: str | None = None, problems: ProblemLog) -> Iterator[Record]:
    """Yield one record per image with at least one usable region, in the regions file's order.

    ``split`` (a key of ``split_pickle``, e.g. ``train`` or ``test``) keeps only those images.
    """
    if not os.path.isdir(image_dir):
        raise DatasetNotFoundError(f"{image_dir}: Visual Genome image folder not found")
    folder = _ImageFolder(image_dir)
    wanted = _split_ids(split_pickle, split)
    require_json_container(regions_json, "[", REGIONS)
    require_json_container(image_data_json, "[", IMAGE_DATA)
    images, unusable = _read_image_data(image_data_json, problems)
    for index, item in enumerate(stream_items(regions_json, "item", REGIONS)):
        image_id = item.get("id", item.get("image_id")) if isinstance(item, dict) else None
        if not is_int(image_id):
            problems.add(regions_json, f"item {index}", "id",
                         "an entry without an integer image id")
            continue
        if wanted is not None and image_id not in wanted:
            continue
        info = images.get(image_id)
        if info is None:
            reason = unusable.get(image_id, "the image is not in image_data.json")
            problems.add(regions_json, f"image {image_id}", "id", f"{reason}; the image is skipped")
            continue
        record = _build_record(regions_json, image_id, item.get("regions"), info, folder,
                               problems)
        if record is not None:
            yield record


def _build_record(path, image_id: int, regions: Any, info: ImageInfo, folder: _ImageFolder,
                  problems: ProblemLog) -> Record | None:
    """The image's record, or None (with a problem) if no region is usable."""
    if not isinstance(regions, list):
        problems.add(path, f"image {image_id}", "regions", "missing or not a list")
        return None
    width, height, location = info
    grouped = _group_regions(path, image_id, regions, width, height, problems)
    if not grouped:
        problems.add(path, f"image {image_id}", "regions",
                     "no usable region (a non-empty phrase and a box inside the image)")
        return None
    return Record(id=str(image_id), image=folder.path(image_id, location),
                  captions=list(grouped),
                  phrases=[Phrase(text=text, boxes=boxes) for text, boxes in grouped.items()],
                  width=width, height=height)


def _group_regions(path, image_id: int, regions: list, width: int, height: int,
                   problems: ProblemLog) -> dict[str, list[list[float]]]:
    """Unique phrase (whitespace collapsed, first-seen order) → the clamped boxes of its regions.

    This is the hot loop (about 5 million regions), so messages are only built for problems.
    """
    grouped: dict[str, list[list[float]]] = {}
    for index, region in enumerate(regions):
        try:
            phrase = region["phrase"]
            x, y, w, h = region["x"], region["y"], region["width"], region["height"]
        except (TypeError, KeyError) as exc:
            _region_problem(path, image_id, region, index, problems,
                            "not an object" if isinstance(exc, TypeError) else f"no {exc}")
            continue
        text = collapse_spaces(phrase) if isinstance(phrase, str) else ""
        if not text:
            _region_problem(path, image_id, region, index, problems, "empty or missing phrase")
            continue
        if not (is_number(x) and is_number(y) and is_number(w) and is_number(h)):
            _region_problem(path, image_id, region, index, problems,
                            f"x, y, width, height must be numbers, got {[x, y, w, h]}")
            continue
        box, note = clamp_box((x, y, w, h), width, height)
        if note:
            problems.add(path, f"image {image_id}", f"{_region_name(region, index)}.box", note,
                         skipped=False)
        if box is not None:
            boxes = grouped.get(text)
            if boxes is None:
                grouped[text] = [box]
            else:
                boxes.append(box)
    return grouped


def collapse_spaces(text: str) -> str:
    """``" ".join(text.split())``, without the work when the text is already like that."""
    if text.isprintable() and "  " not in text and not text.startswith(" ") \
            and not text.endswith(" "):
        return text  # printable text has no whitespace but the plain space
    return " ".join(text.split())


def _region_problem(path, image_id: int, region: Any, index: int, problems: ProblemLog,
                    message: str) -> None:
    problems.add(path, f"image {image_id}", _region_name(region, index),
                 f"{message}; region dropped", skipped=False)


def _region_name(region: Any, index: int) -> str:
    if isinstance(region, dict) and "region_id" in region:
        return f"region {region['region_id']}"
    return f"regions[{index}]"


def clamp_box(xywh: Sequence[float], width: int, height: int
              ) -> tuple[list[float] | None, str | None]:
    """``[x, y, x+w, y+h]`` clamped to the image, and a note when it changed or is dropped.

    The box is None (dropped) if its size is negative or nothing of it is left inside the image.
    Integer coordinates stay integers (a box is a list of numbers).
    """
    x, y, w, h = xywh
    if w < 0 or h < 0:
        return None, f"negative size (width {w:g}, height {h:g}); dropped"
    x1, y1 = x + w, y + h
    if x >= 0 and y >= 0 and x1 <= width and y1 <= height:  # the common case: inside already
        if w > 0 and h > 0:
            return [x, y, x1, y1], None
        return None, f"{_fmt([x, y, x1, y1])} has no area; dropped"
    box = [_clip(x, width), _clip(y, height), _clip(x1, width), _clip(y1, height)]
    if box[2] <= box[0] or box[3] <= box[1]:
        return None, (f"{_fmt([x, y, x1, y1])} has no area inside the {width}x{height} image; "
                      "dropped")
    return box, f"{_fmt([x, y, x1, y1])} clamped to {_fmt(box)} (image {width}x{height})"


def _clip(value: float, limit: int) -> float:
    return 0 if value < 0 else limit if value > limit else value


def _read_image_data(path, problems: ProblemLog) -> tuple[dict[int, ImageInfo], dict[int, str]]:
    """image id → (width, height, where the image is); and id → why an entry is unusable."""
    images: dict[int, ImageInfo] = {}
    unusable: dict[int, str] = {}
    shared: dict[ImageInfo, ImageInfo] = {}
    for index, item in enumerate(stream_items(path, "item", IMAGE_DATA)):
        image_id = item.get("image_id", item.get("id")) if isinstance(item, dict) else None
        if not is_int(image_id):
            problems.add(path, f"item {index}", "image_id", "an entry without an integer image id",
                         skipped=False)
            continue
        width, height = _size(item.get("width")), _size(item.get("height"))
        if width is None or height is None:
            reason = (f"image_data.json gives no usable size (width {item.get('width')!r}, "
                      f"height {item.get('height')!r})")
            problems.add(path, f"image {image_id}", "width", reason, skipped=False)
            unusable[image_id] = reason
            continue
        info = (width, height, _image_location(item.get("url"), image_id))
        images[image_id] = shared.setdefault(info, info)
    return images, unusable


def _split_ids(split_pickle, split: str | None) -> set[int] | None:
    """The image ids of ``split`` from the reference split pickle; None means every image."""
    if split_pickle is None:
        if split is not None:
            raise DatasetError(f"--split {split} needs the split file (SPLIT_PICKLE, the "
                               "reference's data_splits.pickle): give it after IMAGE_DIR")
        return None
    splits = load_pickle(split_pickle, SPLIT_EXPECTED)
    problem = _split_structure_problem(splits)
    if problem:
        raise DatasetError(f"{split_pickle}: expected {SPLIT_EXPECTED}, but {problem}")
    if split is None:
        return None
    if split not in splits:
        raise DatasetError(f"{split_pickle}: no split {split!r}; the file has "
                           f"{', '.join(sorted(splits)) or 'no split'}")
    return set(splits[split])


def _split_structure_problem(splits: Any) -> str | None:
    """What is wrong with a loaded split pickle, or None."""
    if not isinstance(splits, dict):
        return f"found {type(splits).__name__}"
    for name, ids in splits.items():
        if not isinstance(name, str):
            return f"found a key {name!r} that is not a string"
        if not isinstance(ids, (set, frozenset, list, tuple)):
            return f"split {name!r} holds {type(ids).__name__}"
        bad = next((i for i in ids if not is_int(i)), None)
        if bad is not None:
            return f"split {name!r} holds a non-integer id {bad!r}"
    return None


def require_json_container(path: str | os.PathLike, opener: str, what: str) -> None:
    """Fail fast, naming the file, unless its JSON text starts with ``opener`` ("[" or "{")."""
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: {what} not found")
    with open(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    found = head[:1].decode("latin1")
    if found != opener:
        kind = "a JSON list" if opener == "[" else "a JSON object"
        shown = repr(found) if found else "an empty file"
        raise DatasetError(f"{path}: expected {kind} (starting with {opener!r}) as the {what}, "
                           f"found {shown}")


class _ImageFolder:
    """Finds an image file: the URL's ``VG_100K*/name.jpg`` if present, else ``<id>.jpg``."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(root)
        self._subfolders: dict[str, bool] = {}  # saves a failed stat per image when flattened

    def path(self, image_id: int, location: str | None) -> str:
        if location is not None:
            folder, _, name = location.partition("/")
            exists = self._subfolders.get(folder)
            if exists is None:
                exists = self._subfolders[folder] = os.path.isdir(os.path.join(self.root, folder))
            if exists:
                candidate = os.path.join(self.root, folder, name or f"{image_id}.jpg")
                if os.path.isfile(candidate):
                    return candidate
        return os.path.join(self.root, f"{image_id}.jpg")


def _image_location(url: Any, image_id: int) -> str | None:
    """The URL's last two parts: just the folder when the file is ``<id>.jpg``; None if none."""
    if not isinstance(url, str):
        return None
    parts = [p for p in url.split("/") if p]
    if len(parts) < 2 or parts[-1] in (".", "..") or parts[-2] in (".", ".."):
        return None
    if parts[-1] == f"{image_id}.jpg":
        return sys.intern(parts[-2])
    return f"{parts[-2]}/{parts[-1]}"


def _size(value: Any) -> int | None:
    if is_number(value) and value > 0 and float(value).is_integer():
        return int(value)
    return None


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"
