"""The canonical grounding record: one image, its captions and its boxed phrases.

Every reader yields these and the manifest stores them one per JSON line, so the later stages see a
single typed structure whatever the source dataset was. See DESIGN.md, "The grounding manifest".
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

# Phrase types that evaluation skips. Flickr30k Entities marks non-visual mentions "notvisual";
# the readers mark visual mentions that have no box "scene" (the whole scene) or "nobox".
NOTVISUAL = "notvisual"
SCENE = "scene"
NOBOX = "nobox"


class RecordError(ValueError):
    """A record is not well formed; ``field`` is the dotted path of the bad part."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass
class Phrase:
    """A phrase and the boxes that ground it, [x0, y0, x1, y1] in original pixels, borders inclusive.

    With ``caption`` and ``start`` the phrase is the words ``start ...`` of that caption and is
    scored inside the whole sentence; without them it is a query scored alone.
    """

    text: str
    boxes: list[list[float]] = field(default_factory=list)
    caption: int | None = None
    start: int | None = None
    category: str | None = None
    type: str | None = None

    @property
    def words(self) -> list[str]:
        return self.text.split()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text}
        if self.caption is not None:
            out["caption"] = self.caption
            out["start"] = self.start
        out["boxes"] = [[_compact(v) for v in box] for box in self.boxes]
        if self.category is not None:
            out["category"] = self.category
        if self.type is not None:
            out["type"] = self.type
        return out


@dataclass
class Record:
    """One image line of the manifest. ``image`` is an absolute path once read or built."""

    id: str
    image: str
    captions: list[str] = field(default_factory=list)
    phrases: list[Phrase] = field(default_factory=list)
    width: int | None = None
    height: int | None = None

    def to_json(self, root: str | os.PathLike | None = None) -> dict[str, Any]:
        """The manifest line; with ``root`` the image path is written relative to that folder."""
        image = self.image
        if root is not None:
            image = _relative_path(image, root)
        out: dict[str, Any] = {"id": self.id, "image": image}
        if self.width is not None:
            out["width"] = self.width
        if self.height is not None:
            out["height"] = self.height
        out["captions"] = list(self.captions)
        out["phrases"] = [p.to_json() for p in self.phrases]
        return out

    @classmethod
    def from_json(cls, data: Any, root: str | os.PathLike | None = None) -> "Record":
        """Build a record from a parsed manifest line, raising RecordError naming the bad field."""
        if not isinstance(data, dict):
            raise RecordError("(line)", f"expected a JSON object, got {_kind(data)}")
        unknown = set(data) - {"id", "image", "width", "height", "captions", "phrases"}
        if unknown:
            raise RecordError(sorted(unknown)[0], "unknown field (expected id, image, width, "
                              "height, captions, phrases)")
        rid = data.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
            raise RecordError("id", "required, a non-empty string")
        image = data.get("image")
        if not isinstance(image, str) or not image.strip():
            raise RecordError("image", "required, a path relative to the manifest's folder")
        if root is not None and not os.path.isabs(image):
            image = os.path.normpath(os.path.join(root, image))
        width = _optional_size(data, "width")
        height = _optional_size(data, "height")
        captions = data.get("captions", [])
        if not isinstance(captions, list):
            raise RecordError("captions", f"expected a list of strings, got {_kind(captions)}")
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise RecordError(f"captions[{i}]", f"expected a string, got {_kind(caption)}")
        phrases_data = data.get("phrases", [])
        if not isinstance(phrases_data, list):
            raise RecordError("phrases", f"expected a list of objects, got {_kind(phrases_data)}")
        phrases = [_phrase_from_json(p, f"phrases[{i}]") for i, p in enumerate(phrases_data)]
        return cls(id=str(rid), image=image, captions=list(captions), phrases=phrases,
                   width=width, height=height)


def check_record(record: Record, width: int | None = None,
                 height: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (field, problem) for every content problem of a well-formed record.

    ``width``/``height`` (from the decoded image) override the record's own when given. The
    checks need no file access: empty text, boxes out of order or outside the image, phrase
    words that differ from the caption words at ``start``.
    """
    width = width if width is not None else record.width
    height = height if height is not None else record.height
    if not record.captions and not record.phrases:
        yield "captions", "the record has neither captions nor phrases"
    for i, caption in enumerate(record.captions):
        if not caption.strip():
            yield f"captions[{i}]", "empty caption"
    for i, phrase in enumerate(record.phrases):
        where = f"phrases[{i}]"
        if not phrase.text.strip():
            yield f"{where}.text", "empty phrase"
        for j, box in enumerate(phrase.boxes):
            problem = box_problem(box, width, height)
            if problem:
                yield f"{where}.boxes[{j}]", problem
        if phrase.caption is not None:
            if not 0 <= phrase.caption < len(record.captions):
                yield f"{where}.caption", (f"caption {phrase.caption} does not exist "
                                           f"(the record has {len(record.captions)})")
                continue
            words = record.captions[phrase.caption].split()
            mine = phrase.words
            found = words[phrase.start:phrase.start + len(mine)]
            if found != mine:
                yield f"{where}.text", (f"{phrase.text!r} does not match caption {phrase.caption} "
                                        f"words {phrase.start}..: {' '.join(found)!r}")


def box_problem(box: list[float], width: int | None, height: int | None) -> str | None:
    """Why a box is wrong, or None: out of order, or outside a known image size."""
    x0, y0, x1, y1 = box
    if x1 < x0 or y1 < y0:
        return f"{_fmt(box)} is out of order (needs x0 <= x1 and y0 <= y1)"
    if x0 < 0 or y0 < 0:
        return f"{_fmt(box)} starts outside the image (negative coordinate)"
    if width is not None and x1 > width:
        return f"{_fmt(box)} ends outside the image (x1 > width {width})"
    if height is not None and y1 > height:
        return f"{_fmt(box)} ends outside the image (y1 > height {height})"
    return None


def _phrase_from_json(data: Any, where: str) -> Phrase:
    if not isinstance(data, dict):
        raise RecordError(where, f"expected an object, got {_kind(data)}")
    unknown = set(data) - {"text", "boxes", "caption", "start", "category", "type"}
    if unknown:
        raise RecordError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    text = data.get("text")
    if not isinstance(text, str):
        raise RecordError(f"{where}.text", "required, a string")
    boxes = data.get("boxes", [])
    if not isinstance(boxes, list):
        raise RecordError(f"{where}.boxes", f"expected a list of boxes, got {_kind(boxes)}")
    for j, box in enumerate(boxes):
        if (not isinstance(box, list) or len(box) != 4
                or not all(is_number(v) for v in box)):
            raise RecordError(f"{where}.boxes[{j}]", f"expected [x0, y0, x1, y1] numbers, got {box!r}")
    caption, start = data.get("caption"), data.get("start")
    if (caption is None) != (start is None):
        raise RecordError(f"{where}.{'start' if start is None else 'caption'}",
                          "caption and start go together (both or neither)")
    for name, value in (("caption", caption), ("start", start)):
        if value is not None and (not is_int(value) or value < 0):
            raise RecordError(f"{where}.{name}", f"expected a non-negative integer, got {value!r}")
    for name in ("category", "type"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise RecordError(f"{where}.{name}", f"expected a string, got {_kind(data[name])}")
    return Phrase(text=text, boxes=[[float(v) for v in box] for box in boxes], caption=caption,
                  start=start, category=data.get("category"), type=data.get("type"))


def _optional_size(data: dict, name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if not is_int(value) or value <= 0:
        raise RecordError(name, f"expected a positive integer, got {value!r}")
    return value


def _relative_path(image: str, root: str | os.PathLike) -> str:
    try:
        return os.path.relpath(image, root).replace(os.sep, "/")
    except ValueError:  # another drive on Windows: keep it absolute
        return image


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool (JSON's true is not a coordinate)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _compact(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 3)


def _fmt(box: list[float]) -> str:
    return "[" + ", ".join(f"{_compact(v)}" for v in box) + "]"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null",
            bool: "a boolean"}.get(type(value), type(value).__name__)
