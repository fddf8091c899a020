"""What every cache store shares: its header, creation or resumption, the writer lock, cleanup,
and the integrity rules every read path follows.

A store is one zarr v3 group. Its root attributes (written by the driver only) hold the kind
("images" or "text"), the format version, the fingerprint and the full config, so a store
describes itself. Measured facts behind the layout are in DESIGN.md, "The cache".

Integrity (format 2): every chunk carries a crc32c checksum (zarr v3's ``crc32c`` codec after
zstd), so a flipped bit fails the read instead of returning wrong numbers; a chunk missing from
a shard marked done is an error on every read path, never zeros (zarr would fill it in); and
``--overwrite`` replaces only a multigrounding store of the same kind, never a folder that holds
anything else. Format-1 stores (before checksums) are still read and resumed.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import filelock
import numpy as np
import tensorstore as ts
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.core.sync import sync

from multigrounding.cache.fingerprint import config_differences, fingerprint
from multigrounding.errors import MultigroundingError

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
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


class CacheDamagedError(CacheError):
    """Data of a finished shard is missing or fails its checksum. ``detail`` says what, without
    the store's path or the fix (for listings such as ``cache verify``)."""

    def __init__(self, path, detail: str):
        self.detail = detail
        super().__init__(f"{path}: {detail}; {repair_hint(path)}")


def compressors(level: int) -> tuple:
    """zstd at ``level``, then a crc32c checksum of the compressed bytes (format 2)."""
    return (ZstdCodec(level=level), Crc32cCodec())


def repair_hint(path) -> str:
    return (f"`multigrounding cache repair {path}` marks the damaged shards for extraction again; "
            f"then run the same `multigrounding extract` command")


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
    try:
        group = zarr.open_group(str(path), mode="r")
        data = group.attrs.asdict().get(ATTRIBUTE)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise CacheNotFoundError(f"{path}: zarr.json is not a readable zarr group ({exc})") from None
    if not isinstance(data, dict) or "fingerprint" not in data:
        raise CacheNotFoundError(f"{path}: a zarr group, but not a multigrounding cache store")
    header = Header(**{key: data[key] for key in Header.__dataclass_fields__})
    if header.format_version not in READABLE_FORMATS:
        raise CacheMismatchError(f"{path}: cache format {header.format_version}, this version of "
                                 f"multigrounding reads formats {READABLE_FORMATS}; extract again")
    if kind is not None and header.kind != kind:
        raise CacheMismatchError(f"{path}: holds {describe_kind(header)}, not {kind} features")
    return group, header


def describe_kind(header: Header) -> str:
    """'image features (vgg16)', 'text features (hf:all-MiniLM-L6-v2)'."""
    config = header.config
    model = config.get("backbone") if header.kind == "images" else (config.get("encoder") or {}).get("name")
    kind = "image" if header.kind == "images" else header.kind
    return f"{kind} features ({model})" if model else f"{kind} features"


def prepare_store(path: str | Path, kind: str, config: dict, overwrite: bool = False
                  ) -> tuple[zarr.Group, Header, bool]:
    """Create a store for ``config``, or reopen the matching one to resume it.

    Returns (group, header, resumed). A store made with other settings is refused, naming the
    settings that differ, unless ``overwrite``; ``overwrite`` replaces only a multigrounding store
    of the same kind whose folder holds nothing else. A folder holding anything that is not a
    store is never touched. The caller holds the writer lock.
    """
    path = Path(path)
    expected = fingerprint(_fingerprinted(config))
    existing = _existing_header(path)
    if existing is not None:
        if existing.kind != kind:
            raise CacheMismatchError(
                f"{path} holds {describe_kind(existing)}; {'image' if kind == 'images' else kind} "
                f"features go in their own store: choose another --cache")
        if existing.fingerprint == expected:
            return zarr.open_group(str(path), mode="r+"), existing, True
        if not overwrite:
            differences = config_differences(_fingerprinted(existing.config), _fingerprinted(config))
            raise CacheMismatchError(
                f"{path}: this cache was made with other settings; pass --overwrite to replace "
                "it, or choose another --cache. Differences (cache -> now):\n  "
                + "\n  ".join(differences or ["(fingerprint only)"]))
        foreign = foreign_entries(path)
        if foreign:
            raise CacheMismatchError(
                f"{path}: --overwrite replaces only a cache store, and this folder also holds "
                f"{_list(foreign)}; move those away or choose another --cache")
        _clear_store(path)
    elif (path / "zarr.json").exists():
        raise CacheMismatchError(f"{path}: holds a zarr store that multigrounding did not make; "
                                 "choose another --cache")
    elif path.exists() and any(p.name != LOCK_NAME for p in path.iterdir()):
        raise CacheMismatchError(
            f"{path}: exists and holds other files ({_list(sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME))}); "
            "a cache needs a new or empty folder: choose another --cache")
    group = zarr.open_group(str(path), mode="a")  # the folder is empty but for the lock
    header = Header(kind=kind, format_version=FORMAT_VERSION, fingerprint=expected, config=config,
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    group.attrs[ATTRIBUTE] = header.to_json()
    return group, header, False


def _existing_header(path: Path) -> Header | None:
    """The header of the multigrounding store at ``path``, or None when there is none."""
    if not (path / "zarr.json").is_file():
        return None
    try:
        _, header = read_header(path)
    except CacheNotFoundError:
        return None
    except CacheMismatchError:   # a store of a format this version cannot read
        data = json.loads((path / "zarr.json").read_text(encoding="utf-8"))["attributes"][ATTRIBUTE]
        return Header(**{key: data[key] for key in Header.__dataclass_fields__})
    return header


def foreign_entries(path: Path) -> list[str]:
    """Names in a store's folder that are not the store's: its zarr.json, its lock, and zarr
    nodes (folders with a zarr.json) are the store's; anything else is someone else's."""
    return sorted(p.name for p in path.iterdir()
                  if p.name not in ("zarr.json", LOCK_NAME)
                  and not (p.is_dir() and not p.is_symlink() and (p / "zarr.json").is_file()))


def _list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold the store's lock file while writing; a second writer is refused at once.

    The lock is an OS file lock (flock), so a killed writer leaves nothing to clean up. When no
    store came of it (the command was refused), the lock file, and the folder if this made it,
    are removed again: a refused command leaves nothing behind.
    """
    path = Path(path)
    created = not path.exists()
    lock_file = path / LOCK_NAME
    had_lock = lock_file.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(lock_file), timeout=0)
        lock.acquire()
    except filelock.Timeout:
        raise CacheLockedError(f"{path}: another extraction is writing to this cache (it holds "
                               f"{lock_file}); wait for it to finish") from None
    except OSError as exc:
        raise CacheError(f"{path}: cannot write a cache here ({exc.strerror or exc})") from None
    try:
        yield
    finally:
        lock.release()
        if not (path / "zarr.json").exists():
            with contextlib.suppress(OSError):
                if not had_lock:
                    lock_file.unlink()
                if created:
                    path.rmdir()


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
    damaged: list[int] = field(default_factory=list)   # done shards whose data is lost or bad
    notes: list[str] = field(default_factory=list)      # not problems: what could not be checked

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
        if self.header.format_version < 2:
            report.notes.append(f"format {self.header.format_version}: its chunks carry no "
                                "checksums, so a changed bit cannot be detected (extract again "
                                "into a new store for format 2)")
        self._check_layout(report)
        done = self.done_shards()
        missing = self.missing_chunks()
        for shard in range(self.num_shards):
            rows = self.shard_slice(shard)
            if not done[shard]:
                report.problems.append(f"shard {shard} ({self.UNIT} {rows.start}-{rows.stop - 1}): "
                                       "not extracted yet; run the extract command again to finish it")
            elif shard in missing:
                report.damaged.append(shard)
                report.problems.append(
                    f"shard {shard} ({self.item_name(rows.start)} to {self.item_name(rows.stop - 1)}): "
                    f"marked done but its data files are gone: {_list(missing[shard], 3)}")
            else:
                before = len(report.problems)
                self._check_shard(shard, rows, report)
                if len(report.problems) > before:
                    report.damaged.append(shard)
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

    # ------------------------------------------------------------ integrity
    PER_SHARD_ARRAYS: tuple[str, ...] = ()  # arrays stored one chunk (or zarr shard) per store shard

    def _extra_chunks(self, shard: int) -> list[tuple[str, int]]:
        """Other (array, chunk index along axis 0) the shard's data lives in."""
        return []

    def shard_chunk_keys(self, shard: int) -> list[str]:
        """The store keys of every chunk (or zarr shard) file that shard ``shard`` writes."""
        keys = []
        for name, index in [(name, shard) for name in self.PER_SHARD_ARRAYS] + self._extra_chunks(shard):
            array = self.group[name]
            keys.append(f"{name}/" + array.metadata.encode_chunk_key((index,) + (0,) * (array.ndim - 1)))
        return keys

    def stored_keys(self) -> set[str]:
        """Every key the store holds (one listing, also cheap on object stores)."""
        async def collect():
            return {key async for key in self.group.store.list()}
        return sync(collect())

    def missing_chunks(self) -> dict[int, list[str]]:
        """Shard → the chunk files it wrote that are gone, for every shard marked done."""
        present = self.stored_keys()
        missing = {}
        for shard in np.flatnonzero(self.done_shards()):
            gone = [key for key in self.shard_chunk_keys(int(shard)) if key not in present]
            if gone:
                missing[int(shard)] = gone
        return missing

    def tensorstore(self, name: str, context: ts.Context | None = None) -> ts.TensorStore:
        """A read-only tensorstore view of array ``name``, strict: a missing chunk is an error,
        not fill values (tensorstore's ``fill_missing_data_reads``), and checksums are checked."""
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(self.path / name)},
                "fill_missing_data_reads": False}
        return ts.open(spec, read=True, context=context).result()

    def forget_shard(self, shard: int) -> None:
        """Driver side, under the writer lock: delete the shard's data files and clear its done
        flag, so that the next extraction writes the shard again (``cache repair``)."""
        self.group["done"][shard] = 0
        for key in self.shard_chunk_keys(shard):
            sync(self.group.store.delete(key))

    def item_name(self, row: int) -> str:
        """How messages name item ``row`` (an image id, a sequence of an image)."""
        return f"{self.UNIT[:-1]} {row}"

    def check_complete(self) -> None:
        """Refuse a store whose finished shards lost chunk files (zarr would read zeros)."""
        missing = self.missing_chunks()
        if missing:
            shard, keys = next(iter(missing.items()))
            rows = self.shard_slice(shard)
            raise CacheDamagedError(
                self.path, f"{len(missing)} finished shards lost data files, e.g. shard {shard} "
                f"({self.item_name(rows.start)} to {self.item_name(rows.stop - 1)}) has no "
                f"{_list(keys, 3)}")

    def shard_slice(self, shard: int) -> slice:
        start = shard * self.shard_size
        return slice(start, min(start + self.shard_size, self.num_items))

    def done_shards(self) -> np.ndarray:
        return self.group["done"][:].astype(bool)

    def items_in(self, shards) -> int:
        """How many items (images, sequences) the given shards hold."""
        return sum(self.shard_slice(int(s)).stop - self.shard_slice(int(s)).start for s in shards)


def read_rows(store: "ShardedStore", name: str, rows: np.ndarray, view=None, describe=None) -> np.ndarray:
    """Rows of array ``name`` read strictly (tensorstore, in the order given); a missing or
    corrupt chunk raises CacheDamagedError naming the store, the array and the item
    (``describe(row)``, by default the store's ``item_name``)."""
    describe = describe or store.item_name
    view = view if view is not None else store.tensorstore(name)
    try:
        return view[rows].read().result()
    except ValueError:
        pass
    for row in rows:               # find the first damaged row, to name it
        try:
            view[int(row):int(row) + 1].read().result()
        except ValueError as exc:
            reason = str(exc).split(": ", 1)[-1][:200]
            raise CacheDamagedError(store.path, f"{name} of {describe(int(row))} is damaged "
                                                f"({reason})") from None
    raise CacheDamagedError(store.path, f"{name}: rows unreadable")



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


def _clear_store(path: Path) -> None:
    """Remove a store's own entries (its zarr.json and zarr nodes), keeping the lock the caller
    holds; ``prepare_store`` has checked that nothing else is there."""
    for child in path.iterdir():
        if child.name == LOCK_NAME:
            continue
        if child.name == "zarr.json":
            child.unlink()
        elif child.is_dir() and (child / "zarr.json").is_file():
            shutil.rmtree(child)
