"""``cache info``, ``cache verify`` and ``cache plan``: what a store holds, whether it is sound,
and how large one will be before a long extraction starts. Opens a store of either kind by the
kind its header names."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from multigrounding.cache.image_store import ImageFeatureStore
from multigrounding.cache.store import (ShardedStore, VerifyReport, read_header, store_bytes,
                                        writer_lock)
from multigrounding.cache.text_store import TextFeatureStore

STORE_CLASSES: dict[str, type[ShardedStore]] = {cls.KIND: cls for cls in (ImageFeatureStore,
                                                                          TextFeatureStore)}


def open_store(path: str | Path) -> ShardedStore:
    """The store at ``path``, opened read-only as the kind its header names."""
    _, header = read_header(path)
    return STORE_CLASSES[header.kind].open(path)


@dataclass
class StoreInfo:
    path: Path
    kind: str
    fingerprint: str
    created: str
    config: dict
    bytes: int
    progress: dict            # counts: shards done/total, images ok/failed/pending (or sequences)
    failures: list[tuple[int, str, str]] = field(default_factory=list)


def describe(path: str | Path) -> StoreInfo:
    """What a store is, how far its extraction got, and what failed."""
    store = open_store(path)
    header = store.header
    return StoreInfo(Path(path), header.kind, header.fingerprint, header.created, header.config,
                     store_bytes(path), store.progress(), store.failures())


def verify(path: str | Path, progress=None) -> VerifyReport:
    """Read every shard back: present, right shapes and dtypes, finite, failed rows zero."""
    return open_store(path).verify(progress)


def repair(path: str | Path, progress=None) -> VerifyReport:
    """Find every finished shard whose data is lost or damaged (as ``verify``) and mark it for
    extraction again: its data files are deleted and its done flag cleared, under the writer
    lock. The same extract command then rewrites exactly those shards."""
    with writer_lock(path):
        _, header = read_header(path)
        store = STORE_CLASSES[header.kind].open(path, mode="r+")
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
    """Raw float16 size of a visual store (zstd then takes some off; see the README)."""
    per_image = sum(grid * grid * c * 2 for c in channels)
    free = None
    if cache is not None:
        probe = Path(cache)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
    return SizePlan(num_images, per_image, per_image * num_images, free)
