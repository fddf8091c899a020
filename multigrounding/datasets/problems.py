"""Problems found while reading a dataset, collected so one bad record never stops the rest.

Each problem prints as ``FILE:WHERE: field: what is wrong`` where WHERE is a line number for line
formats and a record name (``image 39769``) for JSON, XML and pickle sources.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    file: str
    where: str | int
    field: str
    message: str
    skipped: bool = True  # the record (or the part named by field) was dropped

    def __str__(self) -> str:
        return f"{self.file}:{self.where}: {self.field}: {self.message}"


class ProblemLog:
    """Counts every problem and keeps the first ``keep`` of them for the report."""

    def __init__(self, keep: int = 1000):
        self.keep = keep
        self.problems: list[Problem] = []
        self.count = 0
        self.skipped_records = 0

    def add(self, file: str | os.PathLike, where: str | int, field: str, message: str,
            skipped: bool = True) -> None:
        """Record a problem; ``skipped`` says the whole record was dropped because of it."""
        self.count += 1
        if skipped:
            self.skipped_records += 1
        if len(self.problems) < self.keep:
            self.problems.append(Problem(str(file), where, field, message, skipped))

    def __len__(self) -> int:
        return self.count

    def __bool__(self) -> bool:
        return self.count > 0

    def __iter__(self):
        return iter(self.problems)
