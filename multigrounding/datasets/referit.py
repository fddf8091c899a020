"""ReferIt (refclef) referring expressions as manifest records: each sentence is a boxed query.

The refs come from lichengunc/refer's ``refs(berkeley).p`` / ``refs(unc).p`` (Python 2 pickles,
loaded with the safe unpickler) and the boxes, image sizes and file names from its COCO-style
``instances.json``, streamed with ijson. As in the reference preprocessing, each ref contributes
its unique sentences, all grounded by the ref's annotation box. The split is either Hu et al.'s
``referit_<split>_imlist.txt`` image lists or, without them, each ref's own ``split`` field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from multigrounding.datasets.jsonstream import stream_items
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import Phrase, Record, is_int, is_number
from multigrounding.datasets.safe_pickle import load_pickle
from multigrounding.datasets.visual_genome import clamp_box, require_json_container
from multigrounding.errors import DatasetError, DatasetNotFoundError

INSTANCES = "ReferIt instances file"
REFS_EXPECTED = ("a list of refs, dicts with ref_id, ann_id, image_id, category_id, split and "
                 "sentences")
REQUIRED_KEYS = ("ref_id", "ann_id", "image_id", "sentences")


@dataclass
class _Ref:
    ref_id: Any
    ann_id: int
    category_id: Any
    sentences: list[str]


@dataclass
class _Image:
    file_name: str
    width: int
    height: int


def read_referit(refs_pickle: str | os.PathLike, instances_json: str | os.PathLike,
                 image_dir: str | os.PathLike, split_dir: str | os.PathLike | None = None, *,
                 split: str | None = None, problems: ProblemLog) -> Iterator[Record]:
    """Yield one record per image with at least one usable ref, in the refs file's order.

    With ``split_dir`` the split's images are read from ``referit_<split>_imlist.txt``; without
    it ``split`` selects the refs whose own ``split`` field equals it. ``split=None``: all.
    """
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DatasetNotFoundError(f"{image_dir}: ReferIt image folder not found")
    wanted_images = read_imlist(split_dir, split) if split_dir is not None and split else None
    ref_split = split if split_dir is None else None
    refs = load_pickle(refs_pickle, REFS_EXPECTED)
    if not isinstance(refs, list):
        raise DatasetError(f"{refs_pickle}: expected {REFS_EXPECTED}; found "
                           f"{type(refs).__name__}")
    by_image = _group_refs(refs_pickle, refs, ref_split, wanted_images, problems)
    require_json_container(instances_json, "{", INSTANCES)
    images = _read_images(instances_json, set(by_image))
    anns = _read_annotations(instances_json, {r.ann_id for rs in by_image.values() for r in rs})
    categories = _read_categories(instances_json)
    _report_unknown_categories(refs_pickle, by_image, categories, problems)
    for image_id, image_refs in by_image.items():
        record = _build_record(instances_json, image_id, image_refs, images.get(image_id), anns,
                               categories, image_dir, problems)
        if record is not None:
            yield record


def _build_record(path, image_id: int, refs: list[_Ref], image: _Image | str | None,
                  anns: dict[int, Any], categories: dict[Any, str], image_dir: Path,
                  problems: ProblemLog) -> Record | None:
    """The image's record from its refs, or None (with a problem) if nothing is usable."""
    where = f"image {image_id}"
    if not isinstance(image, _Image):
        problems.add(path, where, "images", image or "the image is not in the file's images")
        return None
    captions: dict[str, None] = {}
    phrases: list[Phrase] = []
    for ref in refs:
        box = _ref_box(path, image_id, ref, anns.get(ref.ann_id), image, problems)
        if box is None:
            continue
        category = categories.get(ref.category_id) if is_int(ref.category_id) else None
        for sentence in ref.sentences:
            captions.setdefault(sentence)
            phrases.append(Phrase(text=sentence, boxes=[box], category=category))
    if not phrases:
        problems.add(path, where, "refs", "no usable ref (sentence and box)")
        return None
    return Record(id=str(image_id), image=os.path.abspath(image_dir / image.file_name),
                  captions=list(captions), phrases=phrases, width=image.width,
                  height=image.height)


def _ref_box(path, image_id: int, ref: _Ref, ann: Any, image: _Image,
             problems: ProblemLog) -> list[float] | None:
    """The ref's annotation box ``[x, y, x+w, y+h]`` clamped to the image, or None (dropped)."""
    where = f"ref {ref.ref_id}"
    if ann is None:
        problems.add(path, where, "ann_id", f"annotation {ref.ann_id} is not in the file; "
                     "ref dropped", skipped=False)
        return None
    ann_image, bbox = ann
    if ann_image != image_id:
        problems.add(path, where, "ann_id", f"annotation {ref.ann_id} belongs to image "
                     f"{ann_image!r}, not {image_id}; ref dropped", skipped=False)
        return None
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
        problems.add(path, where, "bbox", f"annotation {ref.ann_id} has no [x, y, w, h] box "
                     f"(got {bbox!r}); ref dropped", skipped=False)
        return None
    box, note = clamp_box(bbox, image.width, image.height)
    if note:
        problems.add(path, where, "bbox", note, skipped=False)
    return box


def _group_refs(path, refs: list, ref_split: str | None, wanted_images: set[int] | None,
                problems: ProblemLog) -> dict[int, list[_Ref]]:
    """image id → its well-formed refs of the selected split, in file order."""
    by_image: dict[int, list[_Ref]] = {}
    available: set[str] = set()
    for index, raw in enumerate(refs):
        ref = _parse_ref(path, index, raw, problems)
        if ref is None:
            continue
        image_id, ref_field_split = raw["image_id"], raw.get("split")
        if isinstance(ref_field_split, str):
            available.add(ref_field_split)
        if ref_split is not None and ref_field_split != ref_split:
            continue
        if wanted_images is not None and image_id not in wanted_images:
            continue
        by_image.setdefault(image_id, []).append(ref)
    if ref_split is not None and ref_split not in available:
        raise DatasetError(f"{path}: no ref has split {ref_split!r}; the refs' splits are "
                           f"{', '.join(sorted(available)) or 'none'} (or give SPLIT_DIR with "
                           "Hu et al.'s referit_<split>_imlist.txt files)")
    return by_image


def _parse_ref(path, index: int, raw: Any, problems: ProblemLog) -> _Ref | None:
    """A checked ref with its unique non-empty sentences, or None (with a problem)."""
    if not isinstance(raw, dict):
        problems.add(path, f"refs[{index}]", "ref", f"expected a dict, got {type(raw).__name__}",
                     skipped=False)
        return None
    where = f"ref {raw['ref_id']}" if "ref_id" in raw else f"refs[{index}]"
    missing = [key for key in REQUIRED_KEYS if key not in raw]
    if missing:
        problems.add(path, where, missing[0], f"missing (a ref needs {', '.join(REQUIRED_KEYS)})",
                     skipped=False)
        return None
    for key in ("ann_id", "image_id"):
        if not is_int(raw[key]):
            problems.add(path, where, key, f"expected an integer, got {raw[key]!r}",
                         skipped=False)
            return None
    sentences = _unique_sentences(path, where, raw["sentences"], problems)
    if not sentences:
        problems.add(path, where, "sentences", "no usable sentence; ref dropped", skipped=False)
        return None
    return _Ref(raw["ref_id"], raw["ann_id"], raw.get("category_id"), sentences)


def _unique_sentences(path, where: str, sentences: Any, problems: ProblemLog) -> list[str]:
    """The ref's distinct ``sent`` texts, whitespace collapsed, in order."""
    if not isinstance(sentences, list):
        problems.add(path, where, "sentences", "not a list", skipped=False)
        return []
    unique: dict[str, None] = {}
    for index, sentence in enumerate(sentences):
        text = sentence.get("sent") if isinstance(sentence, dict) else None
        text = " ".join(text.split()) if isinstance(text, str) else ""
        if not text:
            problems.add(path, where, f"sentences[{index}].sent", "empty or missing; dropped",
                         skipped=False)
            continue
        unique.setdefault(text)
    return list(unique)


def read_imlist(split_dir: str | os.PathLike, split: str) -> set[int]:
    """The image ids of Hu et al.'s ``referit_<split>_imlist.txt`` (one integer a line)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise DatasetNotFoundError(f"{split_dir}: ReferIt split folder not found")
    path = split_dir / f"referit_{split}_imlist.txt"
    if not path.is_file():
        found = sorted(p.name[len("referit_"):-len("_imlist.txt")]
                       for p in split_dir.glob("referit_*_imlist.txt"))
        raise DatasetNotFoundError(f"{path}: split file not found (splits in {split_dir}: "
                                   f"{', '.join(found) or 'none'})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") \
            from None
    ids: set[int] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            ids.add(int(line.strip()))
        except ValueError:
            raise DatasetError(f"{path}:{number}: expected one integer image id a line, got "
                               f"{line.strip()[:40]!r}") from None
    return ids


def _read_images(path, wanted: set[int]) -> dict[int, _Image | str]:
    """image id → file name and size, for the wanted images; or why the entry is unusable."""
    images: dict[int, _Image | str] = {}
    seen_any = False
    for item in _dicts(stream_items(path, "images.item", INSTANCES)):
        seen_any = True
        image_id = item.get("id")
        if not is_int(image_id) or image_id not in wanted or isinstance(images.get(image_id),
                                                                             _Image):
            continue
        file_name, width, height = item.get("file_name"), item.get("width"), item.get("height")
        if not isinstance(file_name, str) or not file_name.strip():
            images[image_id] = "the image entry has no file_name"
        elif not (_positive_int(width) and _positive_int(height)):
            images[image_id] = f"the image entry has no usable size ({width!r}x{height!r})"
        else:
            images[image_id] = _Image(file_name, int(width), int(height))
    if not seen_any:
        raise DatasetError(f"{path}: no image objects under \"images\"; expected a COCO-style "
                           "instances file with images, annotations and categories")
    return images


def _read_annotations(path, wanted: set[int]) -> dict[int, Any]:
    """annotation id → (image id, bbox), for the annotations the refs name."""
    anns: dict[int, Any] = {}
    for item in _dicts(stream_items(path, "annotations.item", INSTANCES)):
        ann_id = item.get("id")
        if is_int(ann_id) and ann_id in wanted and ann_id not in anns:
            anns[ann_id] = (item.get("image_id"), item.get("bbox"))
    return anns


def _read_categories(path) -> dict[int, str]:
    """category id → name."""
    return {item["id"]: item["name"]
            for item in _dicts(stream_items(path, "categories.item", INSTANCES))
            if is_int(item.get("id")) and isinstance(item.get("name"), str)}


def _report_unknown_categories(path, by_image: dict[int, list[_Ref]], categories: dict[int, str],
                               problems: ProblemLog) -> None:
    """One problem per category id the refs use that the instances file does not name."""
    unknown: dict[Any, Any] = {}
    for refs in by_image.values():
        for ref in refs:
            if ref.category_id is not None and not (is_int(ref.category_id)
                                                    and ref.category_id in categories):
                unknown.setdefault(repr(ref.category_id), ref.ref_id)
    for category, ref_id in unknown.items():
        problems.add(path, f"ref {ref_id}", "category_id", f"category {category} is not in the "
                     "instances file's categories; its phrases have no category", skipped=False)


def _dicts(items: Iterable[Any]) -> Iterator[dict]:
    return (item for item in items if isinstance(item, dict))


def _positive_int(value: Any) -> bool:
    return is_number(value) and value > 0 and float(value).is_integer()
