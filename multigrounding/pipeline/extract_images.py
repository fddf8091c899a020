"""``extract images``: run a frozen backbone once over a manifest's images into a feature store.

The driver reads the manifest, fixes the config and fingerprint, creates or resumes the store
under its lock, and hands one task per unfinished shard to the dask scheduler; workers write
only their own shards, the driver only the attributes. Killing it loses at most the shards in
flight: the same command again finishes only what is left.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dask
import numpy as np

from multigrounding import __version__
from multigrounding.cache.fingerprint import file_sha256, package_versions
from multigrounding.cache.image_store import ImageFeatureStore
from multigrounding.cache.store import remove_stale_partials, store_bytes, writer_lock
from multigrounding.datasets.manifest import read_manifest
from multigrounding.pipeline.image_task import ModelKey, ShardResult, get_backbone, run_image_shard
from multigrounding.pipeline.scheduler import plan_workers, run_tasks

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "torchvision", "timm", "efficientnet-lite-pytorch", "pillow")


@dataclass
class ImageExtraction:
    """Everything ``extract images`` takes (one flat config)."""

    manifest: Path
    cache: Path
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    seed: int = 0
    shard_size: int = 128
    batch_size: int = 16
    device: str = "auto"
    scheduler: str = "distributed"
    workers: int | None = None
    overwrite: bool = False


@dataclass
class ExtractionSummary:
    cache: Path
    images: int
    shards: int
    shards_already_done: int
    shards_run: int = 0
    images_run: int = 0
    failed_images: list[tuple[str, str]] = field(default_factory=list)   # (id, reason)
    failed_shards: list[tuple[int, str]] = field(default_factory=list)   # (shard, error)
    seconds: float = 0.0
    bytes: int = 0
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed_images and not self.failed_shards


def resolve_device(device: str) -> str:
    """``auto`` is cuda when there is a GPU, else cpu."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def extract_images(job: ImageExtraction,
                   progress: Callable[[int, int], None] | None = None) -> ExtractionSummary:
    """Extract every image not yet in the store; ``progress(done, total)`` after each shard."""
    started = time.perf_counter()
    records = list(read_manifest(job.manifest))
    ids, paths = [r.id for r in records], [r.image for r in records]
    device = resolve_device(job.device)
    plan = plan_workers(job.scheduler, job.workers, device)
    key = ModelKey(job.backbone, job.weights, job.seed, device, plan.torch_threads)
    backbone = get_backbone(key)  # fails fast on a bad name or missing weights, before any work
    config = image_store_config(job, backbone, len(ids))
    with writer_lock(job.cache):
        store, resumed = ImageFeatureStore.create_or_resume(job.cache, config, ids, job.overwrite)
        if resumed:
            removed = remove_stale_partials(job.cache)
            log.info("resuming %s (%d stale partial files removed)", job.cache, removed)
        done = store.done_shards()
        pending = [int(s) for s in np.flatnonzero(~done)]
        summary = ExtractionSummary(job.cache, len(ids), store.num_shards, int(done.sum()))
        finished = store.items_in(np.flatnonzero(done))
        if progress is not None:
            progress(finished, len(ids))

        def on_result(result: ShardResult) -> None:
            nonlocal finished
            _record(summary, store, ids, result)
            finished += result.images
            if progress is not None:
                progress(finished, len(ids))

        def on_error(task_index: int, exc: BaseException) -> None:
            summary.failed_shards.append((pending[task_index], f"{type(exc).__name__}: {exc}"))

        tasks = [dask.delayed(run_image_shard, pure=False, name=f"shard-{s}")(
                     str(job.cache), s, paths[store.shard_slice(s)], key, job.batch_size)
                 for s in pending]
        run_tasks(tasks, plan, on_result, on_error, warm=(get_backbone, key))
    summary.seconds = time.perf_counter() - started
    summary.bytes = store_bytes(job.cache)
    return summary


def image_store_config(job: ImageExtraction, backbone, num_images: int) -> dict:
    """The store's config: what shaped the numbers (fingerprinted) and the layout."""
    spec = backbone.spec
    return {
        "manifest_path": str(Path(job.manifest).resolve()),
        "manifest": {"sha256": file_sha256(job.manifest), "images": num_images},
        "backbone": spec.name,
        "weights": backbone.weights_info,
        "levels": [{"name": lv.name, "module": lv.module, "channels": lv.channels,
                    "stride": lv.stride} for lv in spec.levels],
        "grid": spec.grid,
        "input_size": spec.input_size,
        "resize": "bilinear, no crop, aspect not kept; levels bilinear to grid",
        "dtype": "float16",
        "shard_size": job.shard_size,
        "versions": {"multigrounding": __version__, **package_versions(VERSIONED_PACKAGES)},
    }


def _record(summary: ExtractionSummary, store: ImageFeatureStore, ids: list[str],
            result: ShardResult) -> None:
    summary.shards_run += 1
    summary.images_run += result.images
    summary.read_seconds += result.read_seconds
    summary.compute_seconds += result.compute_seconds
    summary.write_seconds += result.write_seconds
    if result.error is not None:
        summary.failed_shards.append((result.shard, result.error))
        return
    first = store.shard_slice(result.shard).start
    summary.failed_images.extend((ids[first + row], reason) for row, reason in result.failed)
