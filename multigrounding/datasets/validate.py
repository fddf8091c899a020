"""``datasets validate``: check every record of a manifest and count what it holds.

A manifest is read by every later stage; finding a truncated image or a box outside its image
here costs seconds, finding it mid-extraction costs hours. Images are decoded on a thread pool
(Pillow releases the GIL while decoding) in a bounded window, so memory stays flat. Images named
by URL (``s3://...``) are read and decoded the same way, with the given storage options.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from multigrounding.datasets.images import ImageProblem, inspect_image
from multigrounding.datasets.manifest import iter_manifest
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import Record, RecordError, check_record


@dataclass
class ValidationReport:
    manifest: Path
    records: int = 0
    bad_records: int = 0
    captions: int = 0
    phrases: int = 0
    boxes: int = 0
    categories: collections.Counter = field(default_factory=collections.Counter)
    problems: ProblemLog = field(default_factory=ProblemLog)

    @property
    def ok(self) -> bool:
        return self.problems.count == 0


def validate_manifest(path: str | os.PathLike, *, check_images: bool = True, jobs: int | None = None,
                      progress: Callable[[int], None] | None = None,
                      storage_options: Mapping[str, Any] | None = None) -> ValidationReport:
    """Check every line of the manifest at ``path``; never raises for a bad record.
    ``storage_options`` reach images named by URL."""
    path = Path(path)
    report = ValidationReport(manifest=path)
    seen: dict[str, int] = {}
    jobs = jobs or min(8, os.cpu_count() or 1)
    window: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for number, item in iter_manifest(path):
            if isinstance(item, RecordError):
                report.records += 1
                _fail(report, path, number, [(item.field, item.message)])
                _tick(progress)
                continue
            size = pool.submit(_image_size, item.image, storage_options) if check_images else None
            window.append((number, item, size))
            if len(window) >= 4 * jobs:
                _check(report, path, seen, *window.popleft(), progress)
        while window:
            _check(report, path, seen, *window.popleft(), progress)
    return report


def _image_size(image: str, storage_options) -> tuple[int, int] | str:
    try:
        return inspect_image(image, storage_options)
    except ImageProblem as exc:
        return str(exc)


def _check(report: ValidationReport, path: Path, seen: dict[str, int], number: int,
           record: Record, size_future, progress) -> None:
    """All checks of one well-formed record, in line order."""
    report.records += 1
    issues: list[tuple[str, str]] = []
    if record.id in seen:
        issues.append(("id", f"duplicate id {record.id!r} (first on line {seen[record.id]})"))
    else:
        seen[record.id] = number
    width, height = record.width, record.height
    if size_future is not None:
        size = size_future.result()
        if isinstance(size, str):
            issues.append(("image", f"{record.image}: {size}"))
        else:
            issues.extend(_size_issues(record, size))
            width, height = size
    issues.extend(check_record(record, width, height))
    if issues:
        _fail(report, path, number, issues)
    else:
        _count(report, record)
    _tick(progress)


def _size_issues(record: Record, size: tuple[int, int]) -> list[tuple[str, str]]:
    issues = []
    for name, declared, actual in (("width", record.width, size[0]), ("height", record.height, size[1])):
        if declared is not None and declared != actual:
            issues.append((name, f"the manifest says {declared}, the image file is {actual}"))
    return issues


def _fail(report: ValidationReport, path: Path, number: int, issues: list[tuple[str, str]]) -> None:
    report.bad_records += 1
    for field_name, message in issues:
        report.problems.add(path, number, field_name, message)


def _count(report: ValidationReport, record: Record) -> None:
    report.captions += len(record.captions)
    report.phrases += len(record.phrases)
    for phrase in record.phrases:
        report.boxes += len(phrase.boxes)
        report.categories[phrase.category or "(none)"] += 1


def _tick(progress) -> None:
    if progress is not None:
        progress(1)
