"""``extract images``: a frozen backbone over a manifest's images, one shard task at a time.

``ImageExtraction`` is the job (one flat config) that ``driver.run_sharded`` runs; its shard task
``run_image_shard`` reads → runs the backbone → writes one whole shard. The task is module-level
and takes only plain, picklable arguments, so dask can ship it to threads, spawned processes or a
distributed cluster alike. Decoding of the next batch runs on a thread while the backbone
computes the current one (Pillow releases the GIL), and an image that fails to decode is
recorded, not fatal.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import zarr

from multigrounding import __version__
from multigrounding.cache.fingerprint import file_sha256, package_versions
from multigrounding.cache.image_store import (FAILED, OK, ImageFeatureStore, ImageLayout,
                                              ImageStoreConfig, LevelInfo)
from multigrounding.cache.location import (Location, is_url,
                                           parse_storage_options)
from multigrounding.datasets.images import ImageProblem, check_url_access, load_rgb
from multigrounding.datasets.manifest import read_manifest
from multigrounding.devices import resolve_device
from multigrounding.pipeline.driver import (ExtractionSummary, ShardJob, ShardResult, run_sharded,
                                             shard_failure)
from multigrounding.pipeline.models import get_model
from multigrounding.settings import setting

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "torchvision", "timm", "efficientnet-lite-pytorch", "pillow")


@dataclass(frozen=True)
class BackboneKey:
    """Everything needed to build the same backbone in any process."""

    backbone: str
    weights: str
    seed: int
    device: str
    torch_threads: int

    def build(self):
        from multigrounding.pipeline.backbones import create_backbone

        return create_backbone(self.backbone, self.weights, seed=self.seed,
                               device=resolve_device(self.device))


@dataclass
class ImageExtraction(ShardJob):
    """Everything ``extract images`` takes (one flat config)."""

    unit: ClassVar[str] = "images"
    store_class: ClassVar[type] = ImageFeatureStore

    manifest: Path = setting(None, "The manifest whose images to extract.", kind="path",
                             path="file", required=True, cli=False)
    cache: str = setting(None, "The feature store to write: a folder, or an object-store URL "
                               "(s3://bucket/prefix).", kind="path", path="store", required=True)
    backbone: str = setting("efficientnet_lite0", "The frozen CNN.", kind="str",
                            registry="backbones")
    weights: str = setting("imagenet", "imagenet (the library's download and cache), random "
                                       "(tests only; recorded as such) or a path to a state-dict "
                                       "file.", kind="str")
    seed: int = setting(0, "Seed for --weights random.", kind="int")
    shard_size: int = setting(128, "Images per shard: the unit of work, retry and resumption.",
                              kind="int", minimum=1)
    batch_size: int = setting(16, "Images per forward pass.", kind="int", minimum=1)

    def layout(self) -> ImageLayout:
        records = list(read_manifest(self.manifest))
        return ImageLayout([r.id for r in records], [r.image for r in records])

    def item_ids(self, layout: ImageLayout) -> list[str]:
        return layout.image_ids

    def model_key(self, device: str, torch_threads: int) -> BackboneKey:
        return BackboneKey(self.backbone, self.weights, self.seed, device, torch_threads)

    def store_config(self, backbone, layout: ImageLayout) -> ImageStoreConfig:
        """What shaped the numbers (fingerprinted) and the layout."""
        spec = backbone.spec
        return ImageStoreConfig(
            manifest_path=str(Path(self.manifest).resolve()),
            manifest={"sha256": file_sha256(self.manifest), "images": len(layout.image_ids)},
            backbone=spec.name,
            weights=backbone.weights_info,
            levels=[LevelInfo(lv.name, lv.module, lv.channels, lv.stride) for lv in spec.levels],
            grid=spec.grid,
            input_size=spec.input_size,
            resize="bilinear, no crop, aspect not kept; levels bilinear to grid",
            dtype="float16",
            shard_size=self.shard_size,
            versions={"multigrounding": __version__, **package_versions(VERSIONED_PACKAGES)})

    def preflight(self, backbone, layout: ImageLayout) -> None:
        """Unreadable images are recorded, not fatal; but images named by URL must be reachable
        with the storage options (one request), or every one of them would fail."""
        check_url_access(layout.paths, self.image_options(layout.paths))

    def input_files(self, layout: ImageLayout) -> list[str]:
        return layout.paths

    def image_options(self, paths: list[str]) -> dict:
        """The storage options for images named by URL, as the workers get them: the endpoint
        and region of the client's environment filled in for s3:// (``Location.parse``)."""
        first = next((path for path in paths if is_url(path)), None)
        if first is None:
            return {}
        return dict(Location.parse(first, parse_storage_options(self.storage_options)).storage_options)

    def shard_inputs(self, layout: ImageLayout, rows: slice) -> tuple[list[str], dict]:
        paths = layout.paths[rows]
        return paths, self.image_options(paths)

    @staticmethod
    def task(store: Location, shard: int, inputs: tuple[list[str], dict], key: BackboneKey,
             batch_size: int) -> ShardResult:
        image_paths, image_options = inputs
        return run_image_shard(store, shard, image_paths, key, batch_size, image_options)


def extract_images(job: ImageExtraction, progress=None) -> ExtractionSummary:
    """Extract every image not yet in the store; ``progress(done, total)`` after each shard."""
    return run_sharded(job, progress)


def run_image_shard(store: Location | str, shard: int, image_paths: list[str], key: BackboneKey,
                    batch_size: int, image_options: dict | None = None) -> ShardResult:
    """Extract and write one whole shard; never raises (errors come back in the result).
    ``store`` is where the store lives (a Location carries its storage options to the worker);
    ``image_options`` are the storage options of images named by URL."""
    result = ShardResult(shard=shard, items=len(image_paths))
    try:
        _extract_shard(store, shard, image_paths, key, batch_size, result, image_options)
    except Exception as exc:  # report, so one bad shard does not stop the others
        log.error("shard %d failed: %s", shard, traceback.format_exc())
        shard_failure(result, exc)
    return result


def _extract_shard(store_path: Location | str, shard: int, image_paths: list[str], key: BackboneKey,
                   batch_size: int, result: ShardResult, image_options: dict | None = None) -> None:
    import torch

    model = get_model(key)
    device = resolve_device(key.device)    # "auto" on a cluster: this worker's GPU, if any
    spec = model.spec
    size, grid = spec.input_size, spec.grid
    count = len(image_paths)
    features = [np.zeros((count, grid, grid, level.channels), np.float16) for level in spec.levels]
    status = np.full(count, OK, np.uint8)
    reasons = [""] * count
    sizes = np.zeros((count, 2), np.int32)
    batches = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(_read_batch, image_paths, batches[0], size,
                                image_options) if batches else None
        for index, rows in enumerate(batches):
            started = time.perf_counter()
            pixels, ok_rows, batch_sizes, problems = pending.result()
            result.read_seconds += time.perf_counter() - started
            if index + 1 < len(batches):
                pending = reader.submit(_read_batch, image_paths, batches[index + 1], size,
                                        image_options)
            for row, reason in problems:
                status[row], reasons[row] = FAILED, reason
                result.failed.append((row, reason))
            for row, wh in zip(rows, batch_sizes):
                sizes[row] = wh
            if not ok_rows:
                continue
            started = time.perf_counter()
            with torch.inference_mode():
                outputs = model(torch.from_numpy(pixels).to(device))
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


def _read_batch(image_paths: list[str], rows: range, size: int, image_options: dict | None = None):
    """Decode a batch: (pixels [n_ok, S, S, 3], ok rows, (w, h) per row, [(row, reason)])."""
    pixels, ok_rows, sizes, problems = [], [], [], []
    for row in rows:
        try:
            array, original = load_rgb(image_paths[row], size, image_options)
        except ImageProblem as exc:
            problems.append((row, f"{image_paths[row]}: {exc}"))
            sizes.append((0, 0))
            continue
        pixels.append(array)
        ok_rows.append(row)
        sizes.append(original)
    stacked = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), np.uint8)
    return stacked, ok_rows, sizes, problems
