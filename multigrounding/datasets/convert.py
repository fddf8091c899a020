"""``datasets convert``: any supported source → a checked manifest, bad records counted, not fatal.

Every record a reader yields is checked again here (unique id, image file present, boxes and
phrase words right) so that a manifest this writes always passes ``datasets validate``'s
record checks; the image decode check stays with ``validate``, which is slower. An image named
by URL (``s3://...``) is not looked up here (that would be a request per record, needing
credentials): ``validate`` reads it.
"""
from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from multigrounding.datasets.formats import get_format
from multigrounding.datasets.manifest import write_manifest
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import Record, check_record, is_url
from multigrounding.errors import DatasetError


@dataclass
class ConvertSummary:
    output: Path
    written: int
    problems: ProblemLog
    seconds: float

    @property
    def skipped(self) -> int:
        return self.problems.skipped_records


def convert_dataset(format_name: str, sources: Sequence[str | os.PathLike],
                    output: str | os.PathLike, *, split: str | None = None,
                    limit: int | None = None, check_images: bool = True,
                    progress: Callable[[int], None] | None = None) -> ConvertSummary:
    """Read ``sources`` in ``format_name`` and write the good records to ``output`` atomically."""
    fmt = get_format(format_name)
    fmt.check_call(sources, split)
    started = time.perf_counter()
    problems = ProblemLog()
    records = fmt.read(*sources, split=split, problems=problems)
    checked = _checked(records, problems, check_images, limit, progress)
    first = next(checked, None)
    if first is None:
        shown = "; ".join(str(p) for p in problems.problems[:3]) or "the source holds no record"
        raise DatasetError(f"no record could be converted from {', '.join(map(str, sources))} "
                           f"({problems.count} problems): {shown}")
    written = write_manifest(itertools.chain([first], checked), output)
    return ConvertSummary(Path(output), written, problems, time.perf_counter() - started)


def _checked(records: Iterator[Record], problems: ProblemLog, check_images: bool,
             limit: int | None, progress) -> Iterator[Record]:
    """Pass on the records that are unique, have their image file and check clean."""
    seen: set[str] = set()
    count = 0
    for record in records:
        if limit is not None and count >= limit:
            return
        where = f"record {record.id}"
        if record.id in seen:
            problems.add(record.image, where, "id", "duplicate id; the first record is kept")
            continue
        if check_images and not is_url(record.image) and not os.path.isfile(record.image):
            problems.add(record.image, where, "image", "file not found")
            continue
        issues = list(check_record(record))
        if issues:
            field, message = issues[0]
            more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
            problems.add(record.image, where, field, message + more)
            continue
        seen.add(record.id)
        count += 1
        if progress is not None:
            progress(1)
        yield record

