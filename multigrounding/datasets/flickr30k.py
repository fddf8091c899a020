"""Read Flickr30k Entities (Plummer et al.) into grounding records, one image at a time.

Flickr30k Entities is the standard phrase grounding benchmark: five captions an image with phrases
marked inline, and a VOC-like XML file giving each coreference chain's boxes. This reader turns
both into the canonical ``Record`` so the rest of the package never sees the native formats, and
it reports every malformed part to a ``ProblemLog`` instead of stopping, because the full dataset
is 31k images and one broken file must not cost the others.
"""
from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import DatasetError, DatasetNotFoundError
from .problems import ProblemLog
from .records import NOBOX, NOTVISUAL, SCENE, Phrase, Record, box_problem

SPLIT_NAMES = ("train", "val", "test")
NOTVISUAL_CHAIN = "0"
_CHAIN_HEADER = re.compile(r"\[/EN#([^/\s\[\]]*)((?:/[^/\s\[\]]*)*)")


class MarkupError(ValueError):
    """A sentence line whose ``[/EN#chain/type words]`` markup is malformed."""


@dataclass
class Mention:
    """One marked phrase of a sentence: its chain, its types and its clean words."""

    chain: str
    types: list[str]
    start: int
    words: list[str] = field(default_factory=list)


@dataclass
class Annotation:
    """What one XML file says: the image size and, per chain, its boxes (0-based) and scene flag."""

    width: int
    height: int
    boxes: dict[str, list[list[float]]] = field(default_factory=dict)
    scene: set[str] = field(default_factory=set)
    chains: set[str] = field(default_factory=set)  # every chain an <object> names


def read_flickr30k(entities_dir: str | os.PathLike, image_dir: str | os.PathLike, *,
                   split: str | None = None, problems: ProblemLog) -> Iterator[Record]:
    """Yield one Record per image of ``split`` (or of every annotation file when None).

    The folders and the split file are checked now, so a wrong path fails at the call; the
    images are then read lazily, one at a time. Problems in single images go to ``problems``.
    """
    entities = Path(entities_dir)
    _require_dir(entities, "Flickr30k Entities folder")
    sentences_dir = entities / "Sentences"
    annotations_dir = entities / "Annotations"
    _require_dir(sentences_dir, "Flickr30k Entities Sentences folder")
    _require_dir(annotations_dir, "Flickr30k Entities Annotations folder")
    if split is None:
        ids = [(image_id, None) for image_id in _annotation_ids(annotations_dir)]
        source = annotations_dir
    else:
        source = _split_file(entities, split)
        ids = _split_ids(source)
    return _read_records(ids, source, sentences_dir, annotations_dir, Path(image_dir), problems)


def _require_dir(path: Path, what: str) -> None:
    """Raise DatasetNotFoundError when ``path`` is not an existing folder."""
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"{what} not found: {path} (expected the Flickr30k Entities layout with "
            "Sentences/, Annotations/ and train.txt, val.txt, test.txt)")


def _annotation_ids(annotations_dir: Path) -> list[str]:
    """Every ``Annotations/<id>.xml`` id, sorted."""
    with os.scandir(annotations_dir) as entries:
        return sorted(entry.name[:-4] for entry in entries
                      if entry.name.endswith(".xml") and entry.is_file())


def _split_file(entities: Path, split: str) -> Path:
    """The split's id list, or DatasetNotFoundError listing the split files that exist."""
    path = entities / f"{split}.txt"
    if not path.is_file():
        present = sorted(p.name for p in entities.glob("*.txt") if p.is_file())
        raise DatasetNotFoundError(
            f"split file not found: {path} (split {split!r}); split files present in "
            f"{entities}: {', '.join(present) if present else 'none'}")
    return path


def _split_ids(path: Path) -> list[tuple[str, int | None]]:
    """(image id, line number) for every non-blank line of a split file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: cannot read the split file ({error}); expected one "
                           "image id a line") from error
    return [(line.strip(), number) for number, line in enumerate(text.splitlines(), 1)
            if line.strip()]


def _read_records(ids: list[tuple[str, int | None]], source: Path, sentences_dir: Path,
                  annotations_dir: Path, image_dir: Path,
                  problems: ProblemLog) -> Iterator[Record]:
    """The streaming part: read and yield each image's record in turn."""
    seen: set[str] = set()
    for image_id, line in ids:
        where = line if line is not None else f"image {image_id}"
        if not _is_plain_name(image_id):
            problems.add(source, where, "id", f"{image_id!r} is not a plain image id (it "
                         "must name files inside Sentences/ and Annotations/); skipped")
            continue
        if image_id in seen:
            problems.add(source, where, "id", f"image {image_id} is listed twice; the repeat "
                         "is skipped")
            continue
        seen.add(image_id)
        record = _read_image(image_id, sentences_dir / f"{image_id}.txt",
                             annotations_dir / f"{image_id}.xml", image_dir, problems)
        if record is not None:
            yield record


def _is_plain_name(image_id: str) -> bool:
    """True when the id is a single file-name component (no folders, no '..')."""
    return (image_id not in (".", "..") and "/" not in image_id and "\\" not in image_id
            and os.sep not in image_id)


def _read_image(image_id: str, sentences_path: Path, annotations_path: Path, image_dir: Path,
                problems: ProblemLog) -> Record | None:
    """One image's record, or None (with one skipping problem logged) when it cannot be built."""
    here = f"image {image_id}"
    if not sentences_path.is_file():
        problems.add(sentences_path, here, "Sentences", "sentence file not found; the image "
                     "is skipped")
        return None
    if not annotations_path.is_file():
        problems.add(annotations_path, here, "Annotations", "annotation file not found; the "
                     "image is skipped")
        return None
    annotation = _read_annotation(annotations_path, image_id, problems)
    if annotation is None:
        return None
    lines = _read_sentence_lines(sentences_path, problems)
    if lines is None:
        return None
    captions, mentions = _parse_sentences(lines, sentences_path, problems)
    if not captions:
        problems.add(sentences_path, here, "Sentences", "no usable sentence (every line is "
                     "empty or malformed); the image is skipped")
        return None
    _report_missing_chains(mentions, annotation, annotations_path, image_id, problems)
    phrases = [_phrase(caption, mention, annotation) for caption, mention in mentions]
    image = os.path.abspath(image_dir / f"{image_id}.jpg")
    return Record(id=image_id, image=image, captions=captions, phrases=phrases,
                  width=annotation.width, height=annotation.height)


# ----------------------------------------------------------------------------- sentences

def _read_sentence_lines(path: Path, problems: ProblemLog) -> list[str] | None:
    """The file's lines decoded as UTF-8, or None (logged, record skipped) when it is not."""
    try:
        data = path.read_bytes()
    except OSError as error:
        problems.add(path, "(file)", "Sentences", f"cannot read the file ({error}); the image "
                     "is skipped")
        return None
    raw_lines = data.split(b"\n")
    if raw_lines and raw_lines[-1] == b"":
        raw_lines.pop()  # the final newline does not start a line
    lines = []
    for number, raw in enumerate(raw_lines, 1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            problems.add(path, number, "sentence", f"not valid UTF-8 (byte "
                         f"0x{raw[error.start]:02x} at column {error.start + 1}); the image "
                         "is skipped")
            return None
        lines.append(text.lstrip("\ufeff") if number == 1 else text)
    return lines


def _parse_sentences(lines: list[str], path: Path, problems: ProblemLog
                     ) -> tuple[list[str], list[tuple[int, Mention]]]:
    """Clean captions and (caption index, mention) pairs; bad lines are logged and dropped."""
    captions: list[str] = []
    mentions: list[tuple[int, Mention]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            problems.add(path, number, "sentence", "empty line; dropped", skipped=False)
            continue
        try:
            words, line_mentions = parse_sentence(line)
        except MarkupError as error:
            problems.add(path, number, "sentence", f"{error}; the sentence is dropped",
                         skipped=False)
            continue
        mentions.extend((len(captions), mention) for mention in line_mentions)
        captions.append(" ".join(words))
    return captions, mentions


def parse_sentence(line: str) -> tuple[list[str], list[Mention]]:
    """Split a marked sentence into its clean words and its mentions, or raise MarkupError."""
    words: list[str] = []
    mentions: list[Mention] = []
    open_mention: Mention | None = None
    for token in line.split():
        if open_mention is None:
            if token.startswith("["):
                open_mention = _open_mention(token, len(words))
            elif "[" in token or "]" in token:
                raise MarkupError(f"{token!r}: a bracket outside a '[/EN#chain/type words]' "
                                  "phrase (']' without '[')")
            else:
                words.append(token)
            continue
        if "[" in token:
            raise MarkupError(f"{token!r}: nested '[' inside the phrase starting at word "
                              f"{open_mention.start}")
        word, closes = (token[:-1], True) if token.endswith("]") else (token, False)
        if "]" in word:
            raise MarkupError(f"{token!r}: stray ']' inside a phrase")
        if word:
            open_mention.words.append(word)
            words.append(word)
        if closes:
            if not open_mention.words:
                raise MarkupError(f"the phrase of chain {open_mention.chain} has no words")
            mentions.append(open_mention)
            open_mention = None
    if open_mention is not None:
        raise MarkupError(f"'[' without ']': the phrase of chain {open_mention.chain} starting "
                          f"at word {open_mention.start} is never closed")
    return words, mentions


def _open_mention(token: str, start: int) -> Mention:
    """Parse a ``[/EN#<chain>/<type>[/<type>...]`` token that opens a phrase."""
    if token.endswith("]"):
        raise MarkupError(f"{token!r}: the phrase has no words")
    match = _CHAIN_HEADER.fullmatch(token)
    if match is None:
        raise MarkupError(f"{token!r}: expected '[/EN#<chain>/<type>' to open a phrase")
    chain, types = match.group(1), match.group(2).split("/")[1:]
    if not chain.isdigit():
        raise MarkupError(f"{token!r}: bad chain id {chain!r} (expected a number)")
    if not types or not all(types):
        raise MarkupError(f"{token!r}: a phrase needs one or more types, as in "
                          "'[/EN#12/people'")
    return Mention(chain=_chain_key(chain), types=types, start=start)


def _chain_key(text: str) -> str:
    """A chain id as used to match sentences with XML: numbers without leading zeros."""
    text = text.strip()
    return str(int(text)) if text.isdigit() else text


def _phrase(caption: int, mention: Mention, annotation: Annotation) -> Phrase:
    """The Phrase of one mention: its chain's boxes and, when it has none, why (its type)."""
    boxes: list[list[float]] = []
    if mention.chain == NOTVISUAL_CHAIN or NOTVISUAL in mention.types:
        kind: str | None = NOTVISUAL
    elif annotation.boxes.get(mention.chain):
        kind = None
        boxes = [list(box) for box in annotation.boxes[mention.chain]]
    elif mention.chain in annotation.scene:
        kind = SCENE
    else:
        kind = NOBOX
    chain = None if mention.chain == NOTVISUAL_CHAIN else mention.chain  # 0: no chain at all
    return Phrase(text=" ".join(mention.words), boxes=boxes, caption=caption,
                  start=mention.start, category=mention.types[0], type=kind, chain=chain)


def _report_missing_chains(mentions: list[tuple[int, Mention]], annotation: Annotation,
                           path: Path, image_id: str, problems: ProblemLog) -> None:
    """Log once per visual chain that the sentences use but no XML <object> names."""
    reported: set[str] = set()
    for caption, mention in mentions:
        chain = mention.chain
        if (chain == NOTVISUAL_CHAIN or NOTVISUAL in mention.types or chain in reported
                or chain in annotation.chains):
            continue
        reported.add(chain)
        problems.add(path, f"image {image_id}", "Annotations object",
                     f"chain {chain} (phrase {' '.join(mention.words)!r} of caption {caption}) "
                     "has no <object> in this file; its phrases are kept without boxes "
                     f"(type {NOBOX})", skipped=False)


# ----------------------------------------------------------------------------- annotations

def _read_annotation(path: Path, image_id: str, problems: ProblemLog) -> Annotation | None:
    """Parse one XML file, or return None (logged, record skipped) when unusable."""
    here = f"image {image_id}"
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError, ValueError) as error:
        problems.add(path, here, "Annotations", f"not well-formed XML ({error}); the image "
                     "is skipped")
        return None
    width = _positive_int(root.findtext("size/width"))
    height = _positive_int(root.findtext("size/height"))
    if width is None or height is None:
        problems.add(path, here, "Annotations size", "missing or invalid <size> (needs "
                     "positive integer <width> and <height>); the image is skipped")
        return None
    annotation = Annotation(width=width, height=height)
    for number, element in enumerate(root.findall("object"), 1):
        _add_object(annotation, element, number, path, here, problems)
    return annotation


def _add_object(annotation: Annotation, element: ET.Element, number: int, path: Path,
                here: str, problems: ProblemLog) -> None:
    """Give the object's boxes (or scene flag) to every chain it names."""
    chains = [_chain_key(name.text) for name in element.findall("name")
              if name.text and name.text.strip()]
    if not chains:
        problems.add(path, here, "Annotations object", f"<object> number {number} has no "
                     "<name>; ignored", skipped=False)
        return
    annotation.chains.update(chains)
    bndboxes = element.findall("bndbox")
    if not bndboxes:
        if _flag(element.findtext("scene")):
            annotation.scene.update(chains)
        return
    for bndbox in bndboxes:
        box = _read_box(bndbox, annotation, chains, path, here, problems)
        if box is not None:
            for chain in chains:
                annotation.boxes.setdefault(chain, []).append(list(box))


def _read_box(bndbox: ET.Element, annotation: Annotation, chains: list[str], path: Path,
              here: str, problems: ProblemLog) -> list[float] | None:
    """One <bndbox> as a 0-based [x0, y0, x1, y1], or None (logged) when it is bad.

    The files hold 1-based pixel indices, borders inclusive. The official
    ``flickr30k_entities_utils.get_annotations`` (BryanPlummer/flickr30k_entities) subtracts 1
    from all four of xmin, ymin, xmax, ymax; we do the same, so x1 = xmax - 1 is still the last
    pixel inside the box.
    """
    owner = f"box of chain {', '.join(chains)}"
    raw = [bndbox.findtext(tag) for tag in ("xmin", "ymin", "xmax", "ymax")]
    values = [_number(text) for text in raw]
    if any(value is None for value in values):
        problems.add(path, here, "Annotations box", f"{owner}: needs numeric xmin, ymin, "
                     f"xmax, ymax, got {raw}; the box is dropped", skipped=False)
        return None
    box = [value - 1.0 for value in values]
    problem = box_problem(box, annotation.width, annotation.height)
    if problem:
        xmin, ymin, xmax, ymax = raw
        problems.add(path, here, "Annotations box", f"{owner} (file xmin={xmin} ymin={ymin} "
                     f"xmax={xmax} ymax={ymax}, 1-based): 0-based {problem}; the box is "
                     "dropped", skipped=False)
        return None
    return box


def _number(text: str | None) -> float | None:
    """A finite number from element text, else None."""
    try:
        value = float((text or "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _positive_int(text: str | None) -> int | None:
    """A positive integer from element text, else None."""
    try:
        value = int((text or "").strip())
    except ValueError:
        return None
    return value if value > 0 else None


def _flag(text: str | None) -> bool:
    """An XML 0/1 flag such as <scene>1</scene>; anything not a positive integer is false."""
    return _positive_int(text) is not None
