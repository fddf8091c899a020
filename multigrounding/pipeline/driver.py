"""The one driver of every sharded extraction: lock, create or resume, schedule, summarise.

An extraction job (``image_task.ImageExtraction``, ``text_task.TextExtraction``, or any new kind)
supplies what differs: its layout (what the manifest alone decides), its store class and
config, its model key and a module-level, picklable shard task. The driver does the rest, the
same way for every kind: resolve the device and the workers, build the model once up front
(a bad name or missing weights fail before any work), take the store's writer lock, create
the store or resume the matching one, hand one task per unfinished shard to the dask
scheduler, and fold each task's result into one summary with read, compute and write seconds.

Workers write only their own shards and the driver only the store's attributes, so killing the
driver loses at most the shards in flight: the same command again finishes only what is left.

The cache may be a local folder or an object-store URL (``s3://bucket/prefix``); each task gets
the store's ``Location`` (URL and storage options, picklable), so workers on other hosts with no
shared disk open the store themselves. Storage options never enter the store's header.
"""
from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import dask
import numpy as np

from multigrounding.cache.location import Location, is_url, parse_storage_options
from multigrounding.cache.store import (ShardedStore, finished_store, remove_stale_partials, shown,
                                        store_bytes, writer_lock)
from multigrounding.devices import resolve_device
from multigrounding.errors import MultigroundingError
from multigrounding.pipeline.models import ModelKey, get_model
from multigrounding.cache.location import STORAGE_OPTIONS_HELP
from multigrounding.pipeline.scheduler import is_cluster_address, plan_workers, run_tasks
from multigrounding.settings import setting

log = logging.getLogger(__name__)

# the options every extraction shares: where it runs and whether it may replace a cache
DEVICE_HELP = "auto (cuda when there is one), cpu, cuda, cuda:1 ..."
SCHEDULER_HELP = ("synchronous, threads, processes, distributed (a local dask.distributed cluster "
                  "sized to the machine) or the address of a running scheduler, tcp://host:8786")
WORKERS_HELP = "Worker processes/threads [default: cores/4, 1 on GPU]."
OVERWRITE_HELP = "Replace a cache made with other settings."


class CacheLocationError(MultigroundingError, ValueError):
    """A cache folder that would mix the feature store with the dataset's own files."""


class ExtractionInterrupted(MultigroundingError, KeyboardInterrupt):
    """Ctrl-C during an extraction: finished shards are kept and a rerun resumes."""


@dataclass
class ShardResult:
    """What one shard task reports back; tasks never raise (one bad shard must not stop the rest)."""

    shard: int
    items: int
    failed: list[tuple[int, str]] = field(default_factory=list)   # (row in the shard, reason)
    error: str | None = None          # the shard could not be written at all
    disk_full: bool = False           # ... because the disk (or quota) is full
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)   # a kind's own stage seconds (decode, ...)


@dataclass
class ExtractionSummary:
    """How an extraction went, for every kind: ``unit`` names its items (images, sequences)."""

    cache: Path | Location          # the folder, or the object-store location
    unit: str
    items: int
    shards: int
    shards_already_done: int
    shards_run: int = 0
    items_run: int = 0
    failed_items: list[tuple[str, str]] = field(default_factory=list)   # (id, reason)
    failed_shards: list[tuple[int, str]] = field(default_factory=list)  # (shard, error)
    seconds: float = 0.0
    bytes: int = 0
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)   # the kind's own totals (captions, ...)
    stages: dict[str, float] = field(default_factory=dict)  # summed ShardResult.stages

    @property
    def ok(self) -> bool:
        return not self.failed_items and not self.failed_shards

    disk_full: bool = False           # a shard failed for want of space

    @property
    def shards_done(self) -> int:
        return self.shards_already_done + self.shards_run - len(self.failed_shards)


@dataclass
class ShardJob:
    """What every extraction job takes, and what a kind of extraction supplies to
    ``run_sharded``: a subclass adds its own fields (with their defaults) and the methods below."""

    unit: ClassVar[str] = "items"             # what the items are called: "images", "sequences"
    store_class: ClassVar[type[ShardedStore]] = ShardedStore

    manifest: Path = setting(None, "The manifest to extract from.", kind="path", path="file",
                             required=True, cli=False)
    cache: str | Path = setting(None, "The feature store to write: a folder, or an object-store "
                                "URL (s3://bucket/prefix).", kind="path", path="store",
                                required=True)
    device: str = setting("auto", DEVICE_HELP, kind="str")
    scheduler: str = setting("distributed", SCHEDULER_HELP, kind="str")
    workers: int | None = setting(None, WORKERS_HELP, kind="int", minimum=1)
    overwrite: bool = setting(False, OVERWRITE_HELP, kind="bool")
    storage_options: str | None = setting(None, STORAGE_OPTIONS_HELP, kind="str")

    def layout(self) -> Any:
        """Everything the manifest alone decides; refuses bad input before any work starts."""
        raise NotImplementedError

    def item_ids(self, layout: Any) -> Sequence[str]:
        """The id of every item, in store order (names failed items)."""
        raise NotImplementedError

    def counts(self, layout: Any) -> dict[str, int]:
        """Totals worth reporting besides the items (captions, phrases)."""
        return {}

    def model_key(self, device: str, torch_threads: int) -> ModelKey:
        """The key of the model the tasks run (built once per process)."""
        raise NotImplementedError

    def preflight(self, model: Any, layout: Any) -> None:
        """Refuse, before any work, input the model cannot take (a caption too long for it)."""

    def store_config(self, model: Any, layout: Any):
        """The store's typed config: everything that shaped the numbers, and the layout."""
        raise NotImplementedError

    def input_files(self, layout: Any) -> Sequence[str]:
        """The files the job reads (images): a cache is never put where they are."""
        return []

    def shard_inputs(self, layout: Any, rows: slice) -> Any:
        """The picklable inputs of the shard holding ``rows`` (image paths, word lists)."""
        raise NotImplementedError

    @staticmethod
    def task(store: Location, shard: int, inputs: Any, key: ModelKey, batch_size: int) -> ShardResult:
        """Compute and write one whole shard (module-level, picklable; never raises)."""
        raise NotImplementedError


def cache_location(job: ShardJob) -> Location:
    """Where the job's store lives: its ``--cache`` with its ``--storage-options``."""
    return Location.parse(job.cache, parse_storage_options(job.storage_options))


def run_sharded(job: ShardJob, progress: Callable[[int, int], None] | None = None
                ) -> ExtractionSummary:
    """Extract every item of ``job`` not yet in its store; ``progress(done, total)`` after each shard."""
    started = time.perf_counter()
    layout = job.layout()
    ids = job.item_ids(layout)
    if is_cluster_address(job.scheduler):
        # The workers' machines are not this one: each resolves the device (auto: its GPU if it
        # has one) and its torch threads itself; here the model is only built to check it.
        plan = plan_workers(job.scheduler, job.workers, job.device)
        key = job.model_key(job.device, plan.torch_threads)
        model = get_model(job.model_key("cpu", plan.torch_threads))
    else:
        device = resolve_device(job.device)
        plan = plan_workers(job.scheduler, job.workers, device)
        key = job.model_key(device, plan.torch_threads)
        model = get_model(key)  # fails fast on a bad name or missing weights, before any work
    job.preflight(model, layout)
    config = job.store_config(model, layout)
    location = cache_location(job)
    where = shown(location)
    check_cache_location(location, job.manifest, job.input_files(layout))
    done_before = None if job.overwrite else finished_store(job.store_class, location, config)
    if done_before is not None:       # nothing to extract: no lock to take
        summary = ExtractionSummary(where, job.unit, len(ids), done_before.num_shards,
                                    done_before.num_shards, counts=job.counts(layout))
        if progress is not None:
            progress(done_before.items_in(np.arange(done_before.num_shards)), len(ids))
        summary.seconds = time.perf_counter() - started
        summary.bytes = store_bytes(location)
        return summary
    with writer_lock(location) as lock:
        store, resumed = job.store_class.create_or_resume(location, config, layout, job.overwrite)
        if resumed:
            removed = remove_stale_partials(location)
            log.info("resuming %s (%d stale partial files removed)", where, removed)
        done = store.done_shards()
        pending = [int(s) for s in np.flatnonzero(~done)]
        summary = ExtractionSummary(where, job.unit, len(ids), store.num_shards,
                                    int(done.sum()), counts=job.counts(layout))
        finished = store.items_in(np.flatnonzero(done))
        if progress is not None:
            progress(finished, len(ids))

        def on_result(result: ShardResult) -> None:
            nonlocal finished
            lock.check()   # a run whose lock was taken over stops here
            _record(summary, store, ids, result)
            finished += result.items
            if progress is not None:
                progress(finished, len(ids))

        def on_error(task_index: int, exc: BaseException) -> None:
            summary.failed_shards.append((pending[task_index], f"{type(exc).__name__}: {exc}"))

        tasks = [dask.delayed(job.task, pure=False, name=f"{job.unit}-shard-{s}")(
                     location, s, job.shard_inputs(layout, store.shard_slice(s)), key,
                     job.batch_size)
                 for s in pending]
        try:
            run_tasks(tasks, plan, on_result, on_error, warm=(get_model, key))
        except KeyboardInterrupt:
            done_now = int(store.done_shards().sum())
            raise ExtractionInterrupted(
                f"interrupted: {where} keeps its {done_now} finished shards of "
                f"{store.num_shards}; run the same command again to resume") from None
    summary.seconds = time.perf_counter() - started
    summary.bytes = store_bytes(location)
    return summary


def shard_failure(result: ShardResult, exc: Exception) -> None:
    """Record why a shard task failed (tasks report errors, they never raise)."""
    result.error = f"{type(exc).__name__}: {exc}"
    result.disk_full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def check_cache_location(cache: str | Path | Location, manifest: Path, inputs: Sequence[str]) -> None:
    """Refuse a cache folder that is, or contains, the dataset's folder or one of its images (a
    cache inside the dataset's folder, such as data/flickr30k/cache, is fine). A cache on an
    object store is refused when any image named by URL lies at or under its prefix (the
    manifest itself is a local file, so the folder rule is about local caches only)."""
    location = Location.parse(cache)
    if not location.is_local:
        prefix = location.url.rstrip("/") + "/"
        for image in inputs:
            if is_url(image) and _normal_url(image).startswith(prefix):
                raise CacheLocationError(f"{location}: holds images of the dataset (e.g. {image}); "
                                         f"give the cache a prefix of its own")
        return
    cache = location.path.resolve()
    dataset = Path(manifest).resolve().parent
    if cache == dataset or cache in dataset.parents:
        raise CacheLocationError(f"{cache}: holds the dataset itself ({Path(manifest).name} is in "
                                 f"{dataset}); give the cache a folder of its own, e.g. "
                                 f"{dataset / 'cache' / Path(cache).name}")
    for image in inputs:
        if is_url(image):
            continue
        resolved = Path(image).resolve()
        if cache in resolved.parents:
            raise CacheLocationError(f"{cache}: holds images of the dataset (e.g. {image}); give the "
                                     f"cache a folder of its own")


def _normal_url(url: str) -> str:
    """A URL as Location writes its own: scheme lower-case, s3a is s3."""
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    return f"{'s3' if scheme == 's3a' else scheme}://{rest}"


def _record(summary: ExtractionSummary, store: ShardedStore, ids: Sequence[str],
            result: ShardResult) -> None:
    summary.shards_run += 1
    summary.items_run += result.items
    summary.read_seconds += result.read_seconds
    summary.compute_seconds += result.compute_seconds
    summary.write_seconds += result.write_seconds
    for stage, seconds in result.stages.items():
        summary.stages[stage] = summary.stages.get(stage, 0.0) + seconds
    if result.error is not None:
        summary.failed_shards.append((result.shard, result.error))
        summary.disk_full = summary.disk_full or result.disk_full
        return
    first = store.shard_slice(result.shard).start
    summary.failed_items.extend((ids[first + row], reason) for row, reason in result.failed)
