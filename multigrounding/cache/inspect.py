"""``cache info``, ``cache verify`` and ``cache plan``: what a store holds, whether it is sound,
and how large one will be before a long extraction starts."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from multigrounding.cache.image_store import FAILED, OK, PENDING, ImageFeatureStore
from multigrounding.cache.store import read_header, store_bytes


@dataclass
class StoreInfo:
    path: Path
    kind: str
    fingerprint: str
    created: str
    config: dict
    bytes: int
    progress: dict            # counts: shards done/total, images ok/failed/pending (or captions)
    failures: list[tuple[int, str, str]] = field(default_factory=list)


def describe(path: str | Path) -> StoreInfo:
    """What a store is, how far its extraction got, and what failed."""
    _, header = read_header(path)
    if header.kind == "images":
        store = ImageFeatureStore.open(path)
        status = store.status()
        done = store.done_shards()
        progress = {"shards_done": int(done.sum()), "shards": store.num_shards,
                    "images": store.num_images, "ok": int((status == OK).sum()),
                    "failed": int((status == FAILED).sum()),
                    "pending": int((status == PENDING).sum())}
        failures = store.failures()
    else:
        from multigrounding.cache.text_store import TextFeatureStore

        store = TextFeatureStore.open(path)
        progress = store.progress()
        failures = []
    return StoreInfo(Path(path), header.kind, header.fingerprint, header.created, header.config,
                     store_bytes(path), progress, failures)


@dataclass
class VerifyReport:
    path: Path
    checked_shards: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | Path, progress=None) -> VerifyReport:
    """Read every shard back: present, right shapes and dtypes, finite, failed rows zero."""
    _, header = read_header(path)
    if header.kind != "images":
        from multigrounding.cache.text_store import verify_text_store

        return verify_text_store(path, progress)
    store = ImageFeatureStore.open(path)
    report = VerifyReport(Path(path))
    _check_layout(store, report)
    done = store.done_shards()
    status = store.status()
    for shard in range(store.num_shards):
        rows = store.shard_slice(shard)
        if not done[shard]:
            report.problems.append(f"shard {shard} (images {rows.start}-{rows.stop - 1}): not "
                                   "extracted yet; run the extract command again to finish it")
        else:
            _check_shard(store, shard, rows, status[rows], report)
        report.checked_shards += 1
        if progress is not None:
            progress(1)
    return report


def _check_layout(store: ImageFeatureStore, report: VerifyReport) -> None:
    grid = store.grid
    for k, (level, declared) in enumerate(zip(store.levels, store.config["levels"])):
        expected = (store.num_images, grid, grid, declared["channels"])
        if level.shape != expected:
            report.problems.append(f"visual/level{k}: shape {level.shape}, config says {expected}")
        if level.dtype != np.float16:
            report.problems.append(f"visual/level{k}: dtype {level.dtype}, expected float16")


def _check_shard(store: ImageFeatureStore, shard: int, rows: slice, status: np.ndarray,
                 report: VerifyReport) -> None:
    if (status == PENDING).any():
        report.problems.append(f"shard {shard}: marked done but has images without a status")
    for k, level in enumerate(store.levels):
        try:
            values = level[rows]
        except Exception as exc:  # a damaged shard file: say which, keep checking the rest
            report.problems.append(f"shard {shard} visual/level{k}: unreadable ({exc})")
            continue
        finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
        for row in np.flatnonzero(~finite):
            report.problems.append(f"visual/level{k} image {rows.start + row}: NaN or Inf values")
        failed_nonzero = (status == FAILED) & values.reshape(len(values), -1).any(axis=1)
        for row in np.flatnonzero(failed_nonzero):
            report.problems.append(f"visual/level{k} image {rows.start + row}: failed but not zero")


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
