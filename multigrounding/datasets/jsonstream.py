"""Streaming the items of a large JSON annotation file with ijson.

COCO's captions_train2014.json is 67 MB and Visual Genome's region descriptions are over 1 GB:
``json.load`` would hold several times that in Python objects. ijson (C backend) walks the file
and hands over one item at a time; this wrapper turns its errors into messages naming the file.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import ijson

from multigrounding.errors import DatasetError, DatasetNotFoundError


def stream_items(path: str | os.PathLike, prefix: str, what: str) -> Iterator[Any]:
    """Yield the items under ``prefix`` (ijson syntax, e.g. ``"images.item"``) of a JSON file.

    Non-integer numbers come back as float, not Decimal. ``what`` names the file's role in errors.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: {what} not found")
    with open(path, "rb") as handle:
        try:
            for item in ijson.items(handle, prefix, use_float=True):
                yield item
        except ijson.JSONError as exc:
            raise DatasetError(f"{path}: not a valid JSON {what}: {_reason(exc)}") from None
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _reason(exc: Exception) -> str:
    message = exc.args[0] if exc.args else ""
    if isinstance(message, bytes):  # yajl reports lexical errors as bytes
        message = message.decode("utf-8", errors="replace")
    lines = str(message).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
