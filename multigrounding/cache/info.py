"""``cache info``, ``cache verify`` and ``cache plan``: what a store holds, whether it is sound,
and how large one will be before a long extraction starts. Opens a store of either kind by the
kind its header names. Every function takes a local path or a ``Location`` (an object-store URL
with its storage options)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from multigrounding.cache.image_store import ImageFeatureStore
from multigrounding.cache.location import Location
from multigrounding.cache.store import (ShardedStore, VerifyReport, read_header, store_bytes,
                                        writer_lock)
from multigrounding.cache.text_store import TextFeatureStore

STORE_CLASSES: dict[str, type[ShardedStore]] = {cls.KIND: cls for cls in (ImageFeatureStore,
                                                                          TextFeatureStore)}


def open_store(where: str | Path | Location) -> ShardedStore:
    """The store at ``where``, opened read-only as the kind its header names."""
    _, header = read_header(where)
    return STORE_CLASSES[header.kind].open(where)


@dataclass
class StoreInfo:
    path: Path | Location
    kind: str
    fingerprint: str
    created: str
    config: dict
    bytes: int
    progress: dict            # counts: shards done/total, images ok/failed/pending (or sequences)
    failures: list[tuple[int, str, str]] = field(default_factory=list)


def describe(where: str | Path | Location) -> StoreInfo:
    """What a store is, how far its extraction got, and what failed."""
    store = open_store(where)
    header = store.header
    return StoreInfo(store.path, header.kind, header.fingerprint, header.created, header.config,
                     store_bytes(store.location), store.progress(), store.failures())


def verify(where: str | Path | Location, progress=None) -> VerifyReport:
    """Read every shard back: present, right shapes and dtypes, finite, failed rows zero."""
    return open_store(where).verify(progress)


def repair(where: str | Path | Location, progress=None) -> VerifyReport:
    """Find every finished shard whose data is lost or damaged (as ``verify``) and mark it for
    extraction again: its data files are deleted and its done flag cleared, under the writer
    lock. The same extract command then rewrites exactly those shards."""
    location = Location.parse(where)
    with writer_lock(location):
        _, header = read_header(location)
        store = STORE_CLASSES[header.kind].open(location, mode="r+")
        report = store.verify(progress)
        for shard in report.damaged:
            store.forget_shard(shard)
    return report


@dataclass
class SizePlan:
    images: int
    bytes_per_image: int
    total_bytes: int
    free_bytes: int | None


def plan_size(num_images: int, grid: int, channels: list[int], cache: str | Path | None) -> SizePlan:
    """Raw float16 size of a visual store (zstd then takes some off; see the README), and the
    free space where a local cache would go (an object store has no such figure)."""
    per_image = sum(grid * grid * c * 2 for c in channels)
    free = None
    if cache is not None and Location.parse(cache).is_local:
        probe = Path(cache)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
    return SizePlan(num_images, per_image, per_image * num_images, free)
