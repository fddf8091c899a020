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

Where a store lives is a ``Location``: a local folder, or an object-store URL with its storage
options (``cache/location.py``). Every function here takes either a path or a Location, and
every rule above holds for both: on an object store the writer lock is a lock object written
with conditional puts (``cache/object_lock.py``) instead of flock, listings replace folder
walks, and a shard object is written whole by one PUT, so there are no temp files to clean.
Storage options never enter a store's header.
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

from multigrounding.cache.errors import (CacheDamagedError, CacheError,  # noqa: F401 (re-exported)
                                         CacheIncompleteError, CacheLockedError,
                                         CacheMismatchError, CacheNotFoundError, repair_hint)
from multigrounding.cache.fingerprint import config_differences, fingerprint
from multigrounding.cache.location import Location, remote_errors
from multigrounding.cache.object_lock import LOCK_KEY as OBJECT_LOCK_NAME
from multigrounding.cache.object_lock import ObjectStoreLock

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
ATTRIBUTE = "multigrounding"
LOCK_NAME = ".lock"
LOCK_NAMES = (LOCK_NAME, OBJECT_LOCK_NAME)   # the lock file; the lock object on object stores
# Config keys (dotted) recorded for the user but not fingerprinted: where a file lies does not
# shape the numbers (its sha256, which is fingerprinted, does).
NOT_FINGERPRINTED = ("manifest_path", "encoder.model", "encoder_files")


def every_chunk(array: zarr.Array) -> zarr.Array:
    """``array`` writing every chunk, even one equal to the fill value, so that a done shard has
    all its files and a missing one always means lost data; zarr's default compares each chunk
    with the fill value first (~40 % of a shard's write time). Set per array: zarr's global
    config, set and restored by threads writing at once, could be left switched for the whole
    process."""
    return array.with_config({"write_empty_chunks": True})


def compressors(level: int) -> tuple:
    """zstd at ``level``, then a crc32c checksum of the compressed bytes (format 2)."""
    return (ZstdCodec(level=level), Crc32cCodec())


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


def shown(location: Location):
    """How messages name a store: its folder (a Path) locally, its URL on an object store."""
    return location.path if location.is_local else location


def _has_root(location: Location) -> bool:
    """Whether the store's zarr.json is there; a store that does not answer is an error."""
    if location.is_local:
        return (location.path / "zarr.json").is_file()
    try:
        return location.exists("zarr.json")
    except remote_errors() as exc:
        raise location.unreachable(exc) from None


def read_header(where: str | Path | Location, kind: str | None = None) -> tuple[zarr.Group, Header]:
    """Open a store read-only and return its group and header, checking its kind."""
    location = Location.parse(where)
    path = shown(location)
    if not _has_root(location):
        hint = "" if location.is_local else (" (or the storage options do not reach it: they are "
                                              "never saved: give --storage-options again)")
        raise CacheNotFoundError(f"{path}: no cache store here (no zarr.json){hint}; run "
                                 f"`multigrounding extract` to make one")
    try:
        group = location.open_group("r")
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


def prepare_store(where: str | Path | Location, kind: str, config: dict, overwrite: bool = False
                  ) -> tuple[zarr.Group, Header, bool]:
    """Create a store for ``config``, or reopen the matching one to resume it.

    Returns (group, header, resumed). A store made with other settings is refused, naming the
    settings that differ, unless ``overwrite``; ``overwrite`` replaces only a multigrounding store
    of the same kind whose folder holds nothing else. A folder holding anything that is not a
    store is never touched. The caller holds the writer lock.
    """
    location = Location.parse(where)
    path = shown(location)
    expected = fingerprint(_fingerprinted(config))
    existing = _existing_header(location)
    if existing is not None:
        if existing.kind != kind:
            raise CacheMismatchError(
                f"{path} holds {describe_kind(existing)}; {'image' if kind == 'images' else kind} "
                f"features go in their own store: choose another --cache")
        if existing.fingerprint == expected:
            return location.open_group("r+"), existing, True
        if not overwrite:
            differences = config_differences(_fingerprinted(existing.config), _fingerprinted(config))
            raise CacheMismatchError(
                f"{path}: this cache was made with other settings; pass --overwrite to replace "
                "it, or choose another --cache. Differences (cache -> now):\n  "
                + "\n  ".join(differences or ["(fingerprint only)"]))
        foreign = foreign_entries(location)
        if foreign:
            raise CacheMismatchError(
                f"{path}: --overwrite replaces only a cache store, and this folder also holds "
                f"{_list(foreign)}; move those away or choose another --cache")
        _clear_store(location)
    elif location.exists("zarr.json"):
        raise CacheMismatchError(f"{path}: holds a zarr store that multigrounding did not make; "
                                 "choose another --cache")
    elif others := [name for name in location.children() if name not in LOCK_NAMES]:
        raise CacheMismatchError(
            f"{path}: exists and holds other files ({_list(others)}); "
            "a cache needs a new or empty folder: choose another --cache")
    group = location.open_group("a")  # the folder is empty but for the lock
    header = Header(kind=kind, format_version=FORMAT_VERSION, fingerprint=expected, config=config,
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    group.attrs[ATTRIBUTE] = header.to_json()
    return group, header, False


def finished_store(store_class, where: str | Path | Location, config):
    """The store at ``where`` when it was made for ``config`` and every shard is done (an
    extraction would have nothing to do), else None. Reads only, without the writer lock: a
    finished store changes only under the lock and only by ``--overwrite`` or ``cache repair``,
    so a second identical extraction started beside a first one succeeds instead of being
    refused."""
    location = Location.parse(where)
    existing = _existing_header(location)
    if (existing is None or existing.kind != store_class.KIND
            or existing.fingerprint != fingerprint(_fingerprinted(config.to_json()))):
        return None
    store = store_class.open(location)
    return store if bool(store.done_shards().all()) else None


def _existing_header(location: Location) -> Header | None:
    """The header of the multigrounding store at ``location``, or None when there is none."""
    if not _has_root(location):
        return None
    try:
        _, header = read_header(location)
    except CacheNotFoundError:
        return None
    except CacheMismatchError:   # a store of a format this version cannot read
        data = json.loads(location.read_bytes("zarr.json").decode("utf-8"))["attributes"][ATTRIBUTE]
        return Header(**{key: data[key] for key in Header.__dataclass_fields__})
    return header


def foreign_entries(where: str | Path | Location) -> list[str]:
    """Names in a store's folder (or prefix) that are not the store's: its zarr.json, its lock,
    and zarr nodes (folders or prefixes with a zarr.json) are the store's; anything else is
    someone else's."""
    location = Location.parse(where)
    if location.is_local:
        path = location.path
        return sorted(p.name for p in path.iterdir()
                      if p.name not in ("zarr.json", *LOCK_NAMES)
                      and not (p.is_dir() and not p.is_symlink() and (p / "zarr.json").is_file()))
    return [name for name in location.children()
            if name not in ("zarr.json", *LOCK_NAMES) and not location.exists(f"{name}/zarr.json")]


def _list(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class _HeldFileLock:
    """What ``writer_lock`` yields for a local store: an OS lock cannot be taken over."""

    def check(self) -> None:
        """Nothing to do: flock is held until this process lets go or dies."""


@contextlib.contextmanager
def writer_lock(where: str | Path | Location) -> Iterator:
    """Hold the store's writer lock while writing; a second writer is refused at once. Yields
    the lock: call its ``check()`` between shards (an object-store lock can be taken over).

    Locally the lock is an OS file lock (flock), so a killed writer leaves nothing to clean up.
    When no store came of it (the command was refused), the lock file, and the folder if this
    made it, are removed again: a refused command leaves nothing behind. On an object store it
    is ``ObjectStoreLock`` (a lock object written with conditional puts, with a heartbeat and a
    stale rule; see cache/object_lock.py), deleted again when released.
    """
    location = Location.parse(where)
    if not location.is_local:
        with _object_store_lock(location) as lock:
            yield lock
        return
    path = location.path
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
        yield _HeldFileLock()
    finally:
        lock.release()
        if not (path / "zarr.json").exists():
            with contextlib.suppress(OSError):
                if not had_lock:
                    lock_file.unlink()
                if created:
                    path.rmdir()


@contextlib.contextmanager
def _object_store_lock(location: Location) -> Iterator:
    lock = ObjectStoreLock(location)
    try:
        lock.acquire()
    except remote_errors() as exc:
        raise location.unreachable(exc) from None
    try:
        yield lock
    finally:
        lock.release()


def remove_stale_partials(where: str | Path | Location) -> int:
    """Delete the ``*.partial`` temp files a killed writer left (zarr writes temp + rename). An
    object store has none: each object is written whole by one PUT."""
    location = Location.parse(where)
    if not location.is_local:
        return 0
    count = 0
    for partial in location.path.rglob("*.partial"):
        partial.unlink(missing_ok=True)
        count += 1
    return count


@dataclass
class VerifyReport:
    """What ``verify`` found: how many shards it checked, and each problem in words."""

    path: Path | Location
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

    def __init__(self, where: str | Path | Location, group: zarr.Group, header: Header):
        self.location = Location.parse(where)
        self.path = shown(self.location)   # for messages: a Path locally, else the URL
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
    def create_or_resume(cls, where: str | Path | Location, config, layout, overwrite: bool = False):
        """Driver side: a new store for ``config`` (the typed config; arrays allocated from
        ``layout``, nothing computed) or the matching existing one. Returns (store, resumed)."""
        location = Location.parse(where)
        group, header, resumed = prepare_store(location, cls.KIND, config.to_json(), overwrite)
        if not resumed:
            cls._allocate(group, config, layout)
        return cls(location, group, header), resumed

    @classmethod
    def open(cls, where: str | Path | Location, mode: str = "r"):
        """Open an existing store: ``r`` to read, ``r+`` for a worker writing its shards."""
        location = Location.parse(where)
        group, header = read_header(location, cls.KIND)
        if mode != "r":
            group = location.open_group(mode)
        return cls(location, group, header)

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

    def tensorstore(self, name: str, context: ts.Context | None = None):
        """A read-only tensorstore view of array ``name``, strict: a missing chunk is an error,
        not fill values (tensorstore's ``fill_missing_data_reads``), and checksums are checked.

        Through tensorstore's kvstore for the location (``file`` locally, ``s3``); on an object
        store a chunk once cached is trusted while the view lives (``recheck_cached_data:
        open``: a finished store does not change, and revalidating costs a request per shard
        per batch; benchmarks/OBJECT_STORE_NOTES.md). Where tensorstore has no kvstore for the
        scheme, the same interface over zarr-python (``zarr_rows.ZarrRowsView``)."""
        kvstore = self.location.kvstore_spec(name)
        if kvstore is None:
            from multigrounding.cache.zarr_rows import ZarrRowsView

            return ZarrRowsView(self.group[name])
        spec = {"driver": "zarr3", "kvstore": kvstore, "fill_missing_data_reads": False}
        if not self.location.is_local:
            spec["recheck_cached_data"] = "open"
        try:
            return ts.open(spec, read=True, context=context).result()
        except ValueError as exc:
            if self.location.is_local:
                raise
            raise self.location.unreachable(exc) from None

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



def store_bytes(where: str | Path | Location) -> int:
    """Bytes stored under the store (on disk, or in its objects)."""
    return Location.parse(where).total_bytes()


def _fingerprinted(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if dotted in NOT_FINGERPRINTED:
            continue
        out[key] = _fingerprinted(value, dotted + ".") if isinstance(value, dict) else value
    return out


def _clear_store(location: Location) -> None:
    """Remove a store's own entries (its zarr.json and zarr nodes), keeping the lock the caller
    holds; ``prepare_store`` has checked that nothing else is there."""
    if not location.is_local:   # one listing, then bulk deletes
        location.delete_all(keep=LOCK_NAMES)
        return
    for child in location.path.iterdir():
        if child.name in LOCK_NAMES:
            continue
        if child.name == "zarr.json":
            child.unlink()
        elif child.is_dir() and (child / "zarr.json").is_file():
            shutil.rmtree(child)
