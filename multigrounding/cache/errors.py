"""The cache's errors, in one module that every cache module (and the lock) can import."""
from __future__ import annotations

from multigrounding.errors import MultigroundingError


class CacheError(MultigroundingError, ValueError):
    """A cache store cannot be used as asked."""


class CacheNotFoundError(CacheError, FileNotFoundError):
    """No multigrounding cache store at the given path."""


class CacheMismatchError(CacheError):
    """The store was made with other settings than the ones asked for."""


class CacheLockedError(CacheError):
    """Another process is writing to the store."""


class CacheIncompleteError(CacheError):
    """The store is missing shards (an extraction stopped early)."""


class CacheDamagedError(CacheError):
    """Data of a finished shard is missing or fails its checksum. ``detail`` says what, without
    the store's path or the fix (for listings such as ``cache verify``)."""

    def __init__(self, path, detail: str):
        self.detail = detail
        super().__init__(f"{path}: {detail}; {repair_hint(path)}")


def repair_hint(path) -> str:
    return (f"`multigrounding cache repair {path}` marks the damaged shards for extraction again; "
            f"then run the same `multigrounding extract` command")
