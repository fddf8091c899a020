"""One shard of visual extraction, as run on a dask worker: read → backbone → write.

The function is module-level and takes only plain, picklable arguments, so dask can ship it to
threads, spawned processes or a distributed cluster alike. The model is loaded once per worker
process (``_MODELS``), warmed up front under dask.distributed (see ``warmup``). Decoding of the
next batch runs on a thread while the backbone computes the current one (Pillow releases the
GIL), and an image that fails to decode is recorded, not fatal.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

import numpy as np
import zarr

from multigrounding.cache.image_store import FAILED, OK, ImageFeatureStore
from multigrounding.datasets.images import ImageProblem, load_rgb

log = logging.getLogger(__name__)

_MODELS: dict[tuple, object] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class ModelKey:
    """Everything needed to build the same backbone in any process."""

    backbone: str
    weights: str
    seed: int
    device: str
    torch_threads: int


@dataclass
class ShardResult:
    shard: int
    images: int
    failed: list[tuple[int, str]] = field(default_factory=list)  # (row, reason)
    error: str | None = None          # the shard could not be written at all
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0


def get_backbone(key: ModelKey):
    """The backbone for ``key``, built once per process."""
    with _MODELS_LOCK:
        model = _MODELS.get(key)
        if model is None:
            import torch

            from multigrounding.pipeline.backbones import create_backbone

            torch.set_num_threads(key.torch_threads)
            model = create_backbone(key.backbone, key.weights, seed=key.seed, device=key.device)
            _MODELS[key] = model
        return model


def run_image_shard(store_path: str, shard: int, image_paths: list[str], key: ModelKey,
                    batch_size: int) -> ShardResult:
    """Extract and write one whole shard; never raises (errors come back in the result)."""
    result = ShardResult(shard=shard, images=len(image_paths))
    try:
        _extract_shard(store_path, shard, image_paths, key, batch_size, result)
    except Exception as exc:  # report, so one bad shard does not stop the others
        log.error("shard %d failed: %s", shard, traceback.format_exc())
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _extract_shard(store_path: str, shard: int, image_paths: list[str], key: ModelKey,
                   batch_size: int, result: ShardResult) -> None:
    import torch

    model = get_backbone(key)
    spec = model.spec
    size, grid = spec.input_size, spec.grid
    count = len(image_paths)
    features = [np.zeros((count, grid, grid, level.channels), np.float16) for level in spec.levels]
    status = np.full(count, OK, np.uint8)
    reasons = [""] * count
    sizes = np.zeros((count, 2), np.int32)
    batches = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(_read_batch, image_paths, batches[0], size) if batches else None
        for index, rows in enumerate(batches):
            started = time.perf_counter()
            pixels, ok_rows, batch_sizes, problems = pending.result()
            result.read_seconds += time.perf_counter() - started
            if index + 1 < len(batches):
                pending = reader.submit(_read_batch, image_paths, batches[index + 1], size)
            for row, reason in problems:
                status[row], reasons[row] = FAILED, reason
                result.failed.append((row, reason))
            for row, wh in zip(rows, batch_sizes):
                sizes[row] = wh
            if not ok_rows:
                continue
            started = time.perf_counter()
            with torch.inference_mode():
                outputs = model(torch.from_numpy(pixels).to(key.device))
            for level, out in zip(features, outputs):
                level[ok_rows] = out.to("cpu", torch.float16).numpy()
            result.compute_seconds += time.perf_counter() - started
    started = time.perf_counter()
    # A shard's chunks are never all fill value worth skipping, and checking each one for it
    # (zarr's default) was ~40 % of the write time (benchmarks/README.md).
    with zarr.config.set({"array.write_empty_chunks": True}):
        store = ImageFeatureStore.open(store_path, mode="r+")
        store.write_shard(shard, features, status, reasons, sizes)
    result.write_seconds = time.perf_counter() - started


def _read_batch(image_paths: list[str], rows: range, size: int):
    """Decode a batch: (pixels [n_ok, S, S, 3], ok rows, (w, h) per row, [(row, reason)])."""
    pixels, ok_rows, sizes, problems = [], [], [], []
    for row in rows:
        try:
            array, original = load_rgb(image_paths[row], size)
        except ImageProblem as exc:
            problems.append((row, f"{image_paths[row]}: {exc}"))
            sizes.append((0, 0))
            continue
        pixels.append(array)
        ok_rows.append(row)
        sizes.append(original)
    stacked = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return stacked, ok_rows, sizes, problems
