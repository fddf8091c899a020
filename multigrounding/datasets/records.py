"""The canonical grounding record: one image, its captions and its boxed phrases.

Every reader yields these and the manifest stores them one per JSON line, so the later stages see a
single typed structure whatever the source dataset was. See DESIGN.md, "The grounding manifest".
"""
from __future__ import annotations

import math
import os
import string
from dataclasses import dataclass, field
from typing import Any, Iterator

# Phrase types that evaluation skips. Flickr30k Entities marks non-visual mentions "notvisual";
# the readers mark visual mentions that have no box "scene" (the whole scene) or "nobox".
NOTVISUAL = "notvisual"
SCENE = "scene"
NOBOX = "nobox"

# Kinds of phrase label (SSAMT phrase-level supervision): a noun phrase with its attributes, or a
# subject-relation-object triple.
ENTITY = "entity"
TRIPLE = "triple"
LABEL_KINDS = (ENTITY, TRIPLE)
# Words a label's identity ignores: "a red shirt" and "the red shirt" are the same label.
ARTICLES = frozenset({"a", "an", "the"})


def is_url(text: str | os.PathLike) -> bool:
    """Whether ``text`` names a remote file (``s3://bucket/key``, any ``scheme://``), which is
    kept as written, not a local path (``file://`` counts as local). Only the text is looked at."""
    scheme, sep, _ = os.fspath(text).partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.lower() not in ("file", "local")


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
    scored inside the whole sentence; without them it is a query scored alone. ``chain`` (optional)
    names what the phrase refers to: the record's phrases with the same chain are one entity
    (Flickr30k Entities' coreference chain, "EN#<chain>"), as entity-level protocols count them.
    """

    text: str
    boxes: list[list[float]] = field(default_factory=list)
    caption: int | None = None
    start: int | None = None
    category: str | None = None
    type: str | None = None
    chain: str | None = None

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
        if self.chain is not None:
            out["chain"] = self.chain
        return out


@dataclass
class Label:
    """A phrase label of one caption: the words ``words`` (ascending indices into
    ``captions[caption].split()``) and their ``text``, exactly those words joined by spaces."""

    caption: int
    kind: str
    words: list[int]
    text: str

    @property
    def key(self) -> str:
        """The identity two captions share: the lowercase text without "a", "an", "the" and
        without punctuation at word edges (COCO's "a surfboard." is "surfboard")."""
        words = (w.strip(string.punctuation) for w in self.text.lower().split())
        return " ".join(w for w in words if w and w not in ARTICLES)

    def to_json(self) -> dict[str, Any]:
        return {"caption": self.caption, "kind": self.kind, "words": list(self.words),
                "text": self.text}


@dataclass
class Record:
    """One image line of the manifest. ``image`` is an absolute path once read or built, or a
    URL (``s3://bucket/key``) as the manifest wrote it."""

    id: str
    image: str
    captions: list[str] = field(default_factory=list)
    phrases: list[Phrase] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    labels: list[Label] | None = None  # None: never labelled (the field is left out)

    def to_json(self, root: str | os.PathLike | None = None) -> dict[str, Any]:
        """The manifest line; with ``root`` the image path is written relative to that folder
        (a URL as it is)."""
        image = self.image
        if root is not None and not is_url(image):
            image = _relative_path(image, root)
        out: dict[str, Any] = {"id": self.id, "image": image}
        if self.width is not None:
            out["width"] = self.width
        if self.height is not None:
            out["height"] = self.height
        out["captions"] = list(self.captions)
        out["phrases"] = [p.to_json() for p in self.phrases]
        if self.labels is not None:
            out["labels"] = [label.to_json() for label in self.labels]
        return out

    @classmethod
    def from_json(cls, data: Any, root: str | os.PathLike | None = None) -> "Record":
        """Build a record from a parsed manifest line, raising RecordError naming the bad field."""
        if not isinstance(data, dict):
            raise RecordError("(line)", f"expected a JSON object, got {_kind(data)}")
        unknown = set(data) - {"id", "image", "width", "height", "captions", "phrases", "labels"}
        if unknown:
            raise RecordError(sorted(unknown)[0], "unknown field (expected id, image, width, "
                              "height, captions, phrases, labels)")
        rid = data.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
            raise RecordError("id", "required, a non-empty string")
        image = data.get("image")
        if not isinstance(image, str) or not image.strip():
            raise RecordError("image", "required, a path relative to the manifest's folder or a URL")
        if root is not None and not os.path.isabs(image) and not is_url(image):
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
        labels = None
        if data.get("labels") is not None:
            labels_data = data["labels"]
            if not isinstance(labels_data, list):
                raise RecordError("labels", f"expected a list of objects, got {_kind(labels_data)}")
            labels = [_label_from_json(x, f"labels[{i}]", captions) for i, x in enumerate(labels_data)]
        return cls(id=str(rid), image=image, captions=list(captions), phrases=phrases,
                   width=width, height=height, labels=labels)


def check_record(record: Record, width: int | None = None,
                 height: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield (field, problem) for every content problem of a well-formed record.

    ``width``/``height`` (from the decoded image) override the record's own when given. The
    checks need no file access: empty text, boxes out of order or outside the image, phrase
    words that differ from the caption words at ``start``, labels that do not fit their caption.
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
    for i, label in enumerate(record.labels or []):
        yield from label_problems(label, record.captions, f"labels[{i}]")


def label_problems(label: Label, captions: list[str], where: str) -> Iterator[tuple[str, str]]:
    """Yield (field, problem) for a label that does not fit ``captions``: unknown kind, caption
    index, word indices out of range or not ascending, text not the joined words."""
    if label.kind not in LABEL_KINDS:
        yield f"{where}.kind", f"unknown kind {label.kind!r} (expected {' or '.join(LABEL_KINDS)})"
    if not 0 <= label.caption < len(captions):
        yield f"{where}.caption", (f"caption {label.caption} does not exist "
                                   f"(the record has {len(captions)})")
        return
    words = captions[label.caption].split()
    if not label.words:
        yield f"{where}.words", "empty (a label has at least one word)"
        return
    for index in label.words:
        if not 0 <= index < len(words):
            yield f"{where}.words", (f"index {index} out of range for caption {label.caption} "
                                     f"({len(words)} words)")
            return
    if any(b <= a for a, b in zip(label.words, label.words[1:])):
        yield f"{where}.words", f"{label.words} are not ascending and distinct"
        return
    joined = " ".join(words[i] for i in label.words)
    if label.text != joined:
        yield f"{where}.text", (f"{label.text!r} is not caption {label.caption} words "
                                f"{label.words}: {joined!r}")


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
    unknown = set(data) - {"text", "boxes", "caption", "start", "category", "type", "chain"}
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
    chain = data.get("chain")
    if chain is not None and (not isinstance(chain, str) or not chain.strip()):
        raise RecordError(f"{where}.chain", f"expected a non-empty string, got {chain!r}")
    return Phrase(text=text, boxes=[[float(v) for v in box] for box in boxes], caption=caption,
                  start=start, category=data.get("category"), type=data.get("type"), chain=chain)


def _label_from_json(data: Any, where: str, captions: list[str]) -> Label:
    """A label whose structure and fit to ``captions`` are right, or the RecordError of the first
    problem (a label the reader passes can be trusted by the training loss)."""
    if not isinstance(data, dict):
        raise RecordError(where, f"expected an object, got {_kind(data)}")
    unknown = set(data) - {"caption", "kind", "words", "text"}
    if unknown:
        raise RecordError(f"{where}.{sorted(unknown)[0]}", "unknown field (expected caption, kind, "
                          "words, text)")
    caption = data.get("caption")
    if not is_int(caption) or caption < 0:
        raise RecordError(f"{where}.caption", f"required, a non-negative integer, got {caption!r}")
    kind = data.get("kind")
    if not isinstance(kind, str):
        raise RecordError(f"{where}.kind", f"required, {' or '.join(LABEL_KINDS)}")
    words = data.get("words")
    if not isinstance(words, list) or not all(is_int(w) for w in words):
        raise RecordError(f"{where}.words", f"required, a list of word indices, got {words!r}")
    text = data.get("text")
    if not isinstance(text, str):
        raise RecordError(f"{where}.text", "required, a string")
    label = Label(caption=caption, kind=kind, words=list(words), text=text)
    for field_name, message in label_problems(label, captions, where):
        raise RecordError(field_name, message)
    return label


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
