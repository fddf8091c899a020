"""What every cache store shares: its header, creation or resumption, the writer lock, cleanup.

A store is one zarr v3 group. Its root attributes (written by the driver only) hold the kind
("images" or "text"), the format version, the fingerprint and the full config, so a store
describes itself. Measured facts behind the layout are in DESIGN.md, "The cache".
"""
from __future__ import annotations

import contextlib
import datetime
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import filelock
import numpy as np
import zarr

from multigrounding.cache.fingerprint import config_differences, fingerprint
from multigrounding.errors import MultigroundingError

FORMAT_VERSION = 1
ATTRIBUTE = "multigrounding"
LOCK_NAME = ".lock"
# Config keys (dotted) recorded for the user but not fingerprinted: where a file lies does not
# shape the numbers (its sha256, which is fingerprinted, does).
NOT_FINGERPRINTED = ("manifest_path", "encoder.model", "encoder_files")


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


@dataclass
class Header:
    kind: str
    format_version: int
    fingerprint: str
    config: dict
    created: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "format_version": self.format_version,
                "fingerprint": self.fingerprint, "config": self.config, "created": self.created}


def read_header(path: str | Path, kind: str | None = None) -> tuple[zarr.Group, Header]:
    """Open a store read-only and return its group and header, checking its kind."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise CacheNotFoundError(f"{path}: no cache store here (no zarr.json); run "
                                 f"`multigrounding extract` to make one")
    group = zarr.open_group(str(path), mode="r")
    data = group.attrs.asdict().get(ATTRIBUTE)
    if not isinstance(data, dict) or "fingerprint" not in data:
        raise CacheNotFoundError(f"{path}: a zarr group, but not a multigrounding cache store")
    header = Header(**{key: data[key] for key in Header.__dataclass_fields__})
    if header.format_version != FORMAT_VERSION:
        raise CacheMismatchError(f"{path}: cache format {header.format_version}, this version of "
                                 f"multigrounding reads format {FORMAT_VERSION}; extract again")
    if kind is not None and header.kind != kind:
        raise CacheMismatchError(f"{path}: holds {header.kind} features, not {kind}")
    return group, header


def prepare_store(path: str | Path, kind: str, config: dict, overwrite: bool = False
                  ) -> tuple[zarr.Group, Header, bool]:
    """Create a store for ``config``, or reopen the matching one to resume it.

    Returns (group, header, resumed). A store made with other settings is refused, naming the
    settings that differ, unless ``overwrite``. The caller holds the writer lock.
    """
    path = Path(path)
    expected = fingerprint(_fingerprinted(config))
    if (path / "zarr.json").is_file() and not overwrite:
        try:
            _, header = read_header(path)
        except CacheNotFoundError:
            raise CacheMismatchError(f"{path}: exists and is not a multigrounding cache; choose "
                                     "another path or pass --overwrite to replace it") from None
        if header.kind != kind or header.fingerprint != expected:
            differences = config_differences({"kind": header.kind, **_fingerprinted(header.config)},
                                             {"kind": kind, **_fingerprinted(config)})
            raise CacheMismatchError(
                f"{path}: this cache was made with other settings; pass --overwrite to replace "
                "it, or choose another --cache. Differences (cache -> now):\n  "
                + "\n  ".join(differences or ["(fingerprint only)"]))
        return zarr.open_group(str(path), mode="r+"), header, True
    if path.exists() and not overwrite and any(p.name != LOCK_NAME for p in path.iterdir()):
        raise CacheMismatchError(f"{path}: exists, is not empty and is not a multigrounding "
                                 "cache; choose another path or pass --overwrite")
    _clear(path)
    group = zarr.open_group(str(path), mode="a")  # the folder is empty but for the lock
    header = Header(kind=kind, format_version=FORMAT_VERSION, fingerprint=expected, config=config,
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    group.attrs[ATTRIBUTE] = header.to_json()
    return group, header, False


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold the store's lock file while writing; a second writer is refused at once.

    The lock is an OS file lock (flock), so a killed writer leaves nothing to clean up.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise CacheLockedError(f"{path}: another extraction is writing to this cache (it holds "
                               f"{path / LOCK_NAME}); wait for it to finish") from None
    try:
        yield
    finally:
        lock.release()


def remove_stale_partials(path: str | Path) -> int:
    """Delete the ``*.partial`` temp files a killed writer left (zarr writes temp + rename)."""
    count = 0
    for partial in Path(path).rglob("*.partial"):
        partial.unlink(missing_ok=True)
        count += 1
    return count


@dataclass
class VerifyReport:
    """What ``verify`` found: how many shards it checked, and each problem in words."""

    path: Path
    checked_shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class ShardedStore:
    """What the visual and the text stores share: a header, a typed config, shards of
    ``shard_size`` items and a ``done`` flag per shard. Subclasses set KIND, CONFIG (the typed
    config class, with ``from_json``), ``_count_items``, ``_allocate``, ``progress`` and the
    per-kind checks ``verify`` runs (``_check_layout``, ``_check_shard``)."""

    KIND = ""
    CONFIG: type = dict
    UNIT = "items"

    def __init__(self, path: str | Path, group: zarr.Group, header: Header):
        self.path = Path(path)
        self.group = group
        self.header = header
        self.config = self.CONFIG.from_json(header.config)
        self.shard_size = int(self.config.shard_size)
        self.num_items = self._count_items()
        self.num_shards = -(-self.num_items // self.shard_size)

    def _count_items(self) -> int:
        raise NotImplementedError

    def progress(self) -> dict:
        """Counts for ``cache info``: shards done, items, and the kind's own totals."""
        raise NotImplementedError

    def failures(self) -> list[tuple[int, str, str]]:
        """(row, id, reason) of every item that could not be extracted."""
        return []

    def verify(self, progress=None) -> VerifyReport:
        """Read every done shard back with the kind's checks; name every shard not done."""
        report = VerifyReport(self.path)
        self._check_layout(report)
        done = self.done_shards()
        for shard in range(self.num_shards):
            rows = self.shard_slice(shard)
            if not done[shard]:
                report.problems.append(f"shard {shard} ({self.UNIT} {rows.start}-{rows.stop - 1}): "
                                       "not extracted yet; run the extract command again to finish it")
            else:
                self._check_shard(shard, rows, report)
            report.checked_shards += 1
            if progress is not None:
                progress(1)
        return report

    def _check_layout(self, report: VerifyReport) -> None:
        raise NotImplementedError

    def _check_shard(self, shard: int, rows: slice, report: VerifyReport) -> None:
        raise NotImplementedError

    @classmethod
    def _allocate(cls, group: zarr.Group, config: dict, layout) -> None:
        raise NotImplementedError

    @classmethod
    def create_or_resume(cls, path: str | Path, config, layout, overwrite: bool = False):
        """Driver side: a new store for ``config`` (the typed config; arrays allocated from
        ``layout``, nothing computed) or the matching existing one. Returns (store, resumed)."""
        group, header, resumed = prepare_store(path, cls.KIND, config.to_json(), overwrite)
        if not resumed:
            cls._allocate(group, config, layout)
        return cls(path, group, header), resumed

    @classmethod
    def open(cls, path: str | Path, mode: str = "r"):
        """Open an existing store: ``r`` to read, ``r+`` for a worker writing its shards."""
        group, header = read_header(path, cls.KIND)
        if mode != "r":
            group = zarr.open_group(str(path), mode=mode)
        return cls(path, group, header)

    def shard_slice(self, shard: int) -> slice:
        start = shard * self.shard_size
        return slice(start, min(start + self.shard_size, self.num_items))

    def done_shards(self) -> np.ndarray:
        return self.group["done"][:].astype(bool)

    def items_in(self, shards) -> int:
        """How many items (images, sequences) the given shards hold."""
        return sum(self.shard_slice(int(s)).stop - self.shard_slice(int(s)).start for s in shards)


def store_bytes(path: str | Path) -> int:
    """Bytes on disk under the store."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _fingerprinted(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if dotted in NOT_FINGERPRINTED:
            continue
        out[key] = _fingerprinted(value, dotted + ".") if isinstance(value, dict) else value
    return out


def _clear(path: Path) -> None:
    """Empty the folder but keep the lock file the caller holds."""
    if not path.exists():
        return
    for child in path.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
