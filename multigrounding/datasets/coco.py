"""COCO captions (``captions_train2014.json`` / ``captions_val2014.json``) as manifest records.

COCO is the paper's training set: captions only, no phrase boxes. The file is streamed twice with
ijson (images, then annotations), so memory holds the captions themselves and nothing more; a
record is built and handed on one image at a time.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from multigrounding.datasets.jsonstream import stream_items
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import Record, is_int
from multigrounding.errors import DatasetNotFoundError

WHAT = "COCO captions file"


def read_coco(captions_json: str | os.PathLike, image_dir: str | os.PathLike, *,
              split: str | None = None, problems: ProblemLog) -> Iterator[Record]:
    """Yield one record per image that has at least one non-empty caption.

    ``split`` does not apply: the captions file (train2014 or val2014) is the split.
    """
    if split is not None:
        raise ValueError("COCO captions files are split already (train2014 / val2014): "
                         "convert the file of the split you want, without --split")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DatasetNotFoundError(f"{image_dir}: COCO image folder not found")
    images = _read_images(captions_json, problems)
    captions = _read_captions(captions_json, images, problems)
    for image_id, (file_name, width, height) in images.items():
        texts = captions.pop(image_id, [])
        if not texts:
            problems.add(captions_json, f"image {image_id}", "annotations",
                         "the image has no caption")
            continue
        yield Record(id=str(image_id), image=os.path.abspath(image_dir / file_name),
                     captions=texts, width=width, height=height)


def _read_images(path, problems: ProblemLog) -> dict[int, tuple[str, int | None, int | None]]:
    """image id → (file name, width, height), in file order."""
    images: dict[int, tuple[str, int | None, int | None]] = {}
    for index, item in enumerate(stream_items(path, "images.item", WHAT)):
        where = f"images[{index}]"
        if not isinstance(item, dict) or not is_int(item.get("id")):
            problems.add(path, where, "id", "an image entry without an integer id")
            continue
        image_id = item["id"]
        file_name = item.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            problems.add(path, f"image {image_id}", "file_name", "missing")
            continue
        if image_id in images:
            problems.add(path, f"image {image_id}", "id", "duplicate image id; the first is kept")
            continue
        images[image_id] = (file_name, _size(item.get("width")), _size(item.get("height")))
    return images


def _read_captions(path, images: dict, problems: ProblemLog) -> dict[int, list[str]]:
    """image id → captions, whitespace collapsed, empty and orphan captions reported."""
    captions: dict[int, list[str]] = {}
    for index, item in enumerate(stream_items(path, "annotations.item", WHAT)):
        if not isinstance(item, dict):
            problems.add(path, f"annotations[{index}]", "annotation", "not an object", skipped=False)
            continue
        where = f"caption {item.get('id', index)}"
        image_id, text = item.get("image_id"), item.get("caption")
        if image_id not in images:
            problems.add(path, where, "image_id", f"image {image_id!r} is not in the file's images",
                         skipped=False)
            continue
        if not isinstance(text, str) or not text.split():
            problems.add(path, where, "caption", "empty caption", skipped=False)
            continue
        captions.setdefault(image_id, []).append(" ".join(text.split()))
    return captions


def _size(value) -> int | None:
    return value if is_int(value) and value > 0 else None
