"""Reading and writing the grounding manifest (JSON Lines, one image a line).

Reading streams line by line; every bad line is reported with its file, line number and field.
Writing is atomic, so an interrupted conversion never leaves a truncated manifest behind.
"""
from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

from multigrounding.atomic import atomic_open
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import Record, RecordError
from multigrounding.errors import DatasetError, DatasetNotFoundError


def iter_manifest(path: str | os.PathLike) -> Iterator[tuple[int, Record | RecordError]]:
    """Yield ``(line_number, record or the error that line has)`` for every non-blank line.

    A UTF-8 byte-order mark at the start is skipped (as ``utf-8-sig`` would, everywhere a
    manifest is read); a manifest with no record at all is an error, not an empty dataset.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: manifest not found" if not path.exists() else
                                   f"{path}: is not a file")
    root = path.resolve().parent
    lines = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, RecordError("(line)", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                                    f"at column {exc.start + 1})")
                continue
            if not text.strip():
                continue
            lines += 1
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, RecordError("(line)", f"not valid JSON: {exc.msg} at column {exc.colno}")
                continue
            try:
                yield number, Record.from_json(data, root=root)
            except RecordError as exc:
                yield number, exc
    if not lines:
        raise DatasetError(f"{path}: the manifest is empty (no records); convert a dataset into it "
                           f"with `multigrounding datasets convert`")


def read_manifest(path: str | os.PathLike, problems: ProblemLog | None = None) -> Iterator[Record]:
    """Stream the records of a manifest.

    With ``problems`` a bad line is logged and skipped; without, it raises DatasetError.
    """
    for number, item in iter_manifest(path):
        if isinstance(item, RecordError):
            if problems is None:
                raise DatasetError(f"{path}:{number}: {item.field}: {item.message}")
            problems.add(path, number, item.field, item.message)
            continue
        yield item


def write_manifest(records: Iterable[Record], path: str | os.PathLike) -> int:
    """Write records atomically, image paths relative to the manifest's folder; return the count."""
    path = Path(path)
    root = path.resolve().parent
    count = 0
    with atomic_open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json(root=root), ensure_ascii=False) + "\n")
            count += 1
    return count
