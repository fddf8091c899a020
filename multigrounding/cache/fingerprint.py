"""The cache key: a hash of everything that shaped the cached numbers, and a readable diff.

A cache is only reused (resumed, trained on) when its fingerprint equals the one the current
command would write; when it does not, ``config_differences`` says which settings differ so the
message can name them (the approach of huggingface/datasets' fingerprint.py, in a few lines).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from typing import Any, Iterable

_BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(config: dict) -> str:
    """A short stable hash of a JSON-able config (key order does not matter)."""
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()[:16]


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Installed versions of the named distributions (None when one is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Lines ``key: old -> new`` for every leaf that differs between two JSON-able configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{where}: (absent) -> {_short(new[key])}")
            elif key not in new:
                lines.append(f"{where}: {_short(old[key])} -> (absent)")
            else:
                lines.extend(config_differences(old[key], new[key], where))
        return lines
    if old != new:
        return [f"{prefix or '(config)'}: {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any, limit: int = 80) -> str:
    text = canonical_json(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
