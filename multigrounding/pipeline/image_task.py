"""``extract images``: a frozen backbone over a manifest's images, one shard task at a time.

``ImageExtraction`` is the job (one flat config) that ``driver.run_sharded`` runs; its shard task
``run_image_shard`` reads → runs the backbone → writes one whole shard. The task is module-level
and takes only plain, picklable arguments, so dask can ship it to threads, spawned processes or a
distributed cluster alike. An image that fails to decode is recorded, not fatal.

On a GPU the data path around the model is the whole cost (benchmarks/bench_data_path.py), so
within a shard every stage overlaps the others, each on a pool that lives as long as the worker
process:

* decoding: the next two batches' images on a pool of threads (Pillow releases the GIL), or
  with ``decoder="torchvision"`` whole batches with ``torchvision.io.decode_jpeg`` on the job's
  device (nvJPEG on CUDA) and resized there, Pillow taking any file it rejects;
* the forward, in the job's compute dtype, and the float16 cast on the device;
* encoding: each image's chunk of each level compressed with its level's codec and checksummed
  on a pool of threads, as soon as its batch is computed;
* writing: one thread appends the encoded chunks in row order to each level's shard file
  (``cache.shard_file``), at most two batches behind the forward.

Only once every level's shard file is in place are the shard's per-image records written, and
its ``done`` flag last, so a killed run resumes as before (byte-identical to a clean one).
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from multigrounding import __version__
from multigrounding.cache.fingerprint import file_sha256, package_versions
from multigrounding.cache.image_store import (FAILED, LEVEL_CODECS, OK, ImageFeatureStore,
                                              ImageLayout, ImageStoreConfig, LevelInfo)
from multigrounding.cache.location import Location, is_url, parse_storage_options
from multigrounding.cache.shard_file import ShardFile, UnsupportedLayout
from multigrounding.datasets.images import ImageProblem, check_url_access, load_rgb
from multigrounding.datasets.manifest import read_manifest
from multigrounding.devices import resolve_device
from multigrounding.errors import MultigroundingError
from multigrounding.pipeline.data_path import choose_codecs, raw_bytes
from multigrounding.pipeline.driver import (ExtractionSummary, ShardJob, ShardResult, run_sharded,
                                             shard_failure)
from multigrounding.pipeline.models import get_model
from multigrounding.settings import setting

log = logging.getLogger(__name__)

VERSIONED_PACKAGES = ("torch", "torchvision", "timm", "efficientnet-lite-pytorch", "pillow")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODERS = ("pillow", "torchvision")
AHEAD = 2   # batches decoded ahead of the forward, and batches of chunks in flight behind it

class ExtractionSettingError(MultigroundingError, ValueError):
    """An ``extract images`` setting that cannot be used."""


@dataclass(frozen=True)
class BackboneKey:
    """Everything needed to build the same backbone in any process."""

    backbone: str
    weights: str
    seed: int
    device: str
    torch_threads: int
    dtype: str = "float32"

    def build(self):
        import torch

        from multigrounding.pipeline.backbones import create_backbone

        device = resolve_device(self.device)    # "auto" on a cluster: this worker's GPU, if any
        model = create_backbone(self.backbone, self.weights, seed=self.seed, device=device)
        return model.set_precision(getattr(torch, self.dtype), channels_last=device.startswith("cuda"))


@dataclass(frozen=True)
class ShardInputs:
    """What one shard task reads, and how: its image paths, the decoder, the threads, and the
    storage options of images named by URL."""

    paths: list[str]
    decoder: str = "pillow"
    threads: int | None = None     # decoding and encoding threads (None: the key's torch threads)
    options: dict | None = None    # storage options for images named by URL


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
    dtype: str = setting("auto", "The backbone's compute dtype: auto (float16 on CUDA, float32 on "
                                 "the CPU), float32, bfloat16 or float16. Features are stored as "
                                 "float16 either way; the dtype is part of the cache's identity.",
                         kind="str", choices=DTYPES)
    codecs: str = setting("auto", "Compression of the visual levels: auto (per level, what the "
                                  "backbone's measured figures say pays), or none, lz4 or zstd1 "
                                  "for every level, or one per level (none,none,none,zstd1). "
                                  "Every chunk carries a crc32c checksum either way.", kind="str")
    decoder: str = setting("pillow", "pillow (CPU threads), or torchvision: JPEG files decoded in "
                                     "batches on the device (nvJPEG on CUDA), others by Pillow.",
                           kind="str", choices=DECODERS)
    decode_threads: int | None = setting(None, "Decoding and encoding threads per worker "
                                               "[default: the worker's share of the cores].",
                                         kind="int", minimum=1)

    def __post_init__(self):
        self.level_codecs(1)   # refuse a bad --codecs before any work

    def level_codecs(self, levels: int, backbone: str | None = None,
                     grid_bytes: list[int] | None = None) -> list[str]:
        """The codec of each of ``levels`` levels that ``codecs`` asks for (``auto``: what the
        measured figures say pays on the reference GPU machine; ``data_path.choose_codecs``)."""
        backbone = backbone or self.backbone
        if self.codecs == "auto":
            from multigrounding.pipeline.backbones import get_backbone_spec, list_backbones

            if grid_bytes is None and levels > 1 and backbone in list_backbones():
                spec = get_backbone_spec(backbone)
                grid_bytes = raw_bytes(spec.grid, [lv.channels for lv in spec.levels])
            return list(choose_codecs(backbone, levels, grid_bytes=grid_bytes))
        names = [name.strip() for name in str(self.codecs).split(",")]
        bad = [name for name in names if name not in LEVEL_CODECS]
        if bad:
            raise ExtractionSettingError(f"--codecs {self.codecs}: unknown codec {bad[0]!r}; choose "
                                         f"auto or {', '.join(LEVEL_CODECS)} (one, or one per level)")
        if len(names) == 1:
            return names * levels
        if len(names) != levels and levels > 1:
            raise ExtractionSettingError(f"--codecs {self.codecs}: {len(names)} codecs for "
                                         f"{levels} levels of {backbone}")
        return names

    def compute_dtype(self, device: str) -> str:
        """float16 on CUDA by default: it keeps 3 more mantissa bits than bfloat16, which the
        features show (efficientnet_lite0: 0.4-0.7 % relative error against float32, bfloat16
        4-6 %; benchmarks/README.md), and they are stored as float16 anyway. A forward that
        overflows float16 fails its shard with a message (``_check_finite``)."""
        if self.dtype == "auto":
            return "float16" if device.startswith("cuda") else "float32"
        return self.dtype

    def layout(self) -> ImageLayout:
        records = list(read_manifest(self.manifest))
        return ImageLayout([r.id for r in records], [r.image for r in records])

    def item_ids(self, layout: ImageLayout) -> list[str]:
        return layout.image_ids

    def model_key(self, device: str, torch_threads: int) -> BackboneKey:
        return BackboneKey(self.backbone, self.weights, self.seed, device, torch_threads,
                           self.compute_dtype(device))

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
            versions={"multigrounding": __version__, **package_versions(VERSIONED_PACKAGES)},
            codecs=self.level_codecs(len(spec.levels), spec.name,
                                     raw_bytes(spec.grid, [lv.channels for lv in spec.levels])),
            compute_dtype=str(getattr(backbone, "compute_dtype", "float32")).removeprefix("torch."),
            decoder=self.decoder)

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

    def shard_inputs(self, layout: ImageLayout, rows: slice) -> ShardInputs:
        paths = layout.paths[rows]
        return ShardInputs(paths, self.decoder, self.decode_threads, self.image_options(paths))

    @staticmethod
    def task(store: Location, shard: int, inputs: ShardInputs, key: BackboneKey,
             batch_size: int) -> ShardResult:
        return run_image_shard(store, shard, inputs, key, batch_size)


def extract_images(job: ImageExtraction, progress=None) -> ExtractionSummary:
    """Extract every image not yet in the store; ``progress(done, total)`` after each shard."""
    return run_sharded(job, progress)


def run_image_shard(store: Location | str, shard: int, inputs: ShardInputs | list[str],
                    key: BackboneKey, batch_size: int) -> ShardResult:
    """Extract and write one whole shard; never raises (errors come back in the result).
    ``store`` is where the store lives (a Location carries its storage options to the worker)."""
    if not isinstance(inputs, ShardInputs):
        inputs = ShardInputs(list(inputs))
    result = ShardResult(shard=shard, items=len(inputs.paths))
    try:
        _extract_shard(store, shard, inputs, key, batch_size, result)
    except Exception as exc:  # report, so one bad shard does not stop the others
        log.error("shard %d failed: %s", shard, traceback.format_exc())
        shard_failure(result, exc)
    return result


# ----------------------------------------------------------------------- the worker's pools

class _Pools:
    """A worker process's threads: decoding, encoding (``threads`` each) and one writer."""

    def __init__(self, threads: int):
        self.decode = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="mg-decode")
        self.encode = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="mg-encode")
        self.write = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mg-write")


_POOLS: dict[int, _Pools] = {}
_POOLS_LOCK = threading.Lock()


def _pools(threads: int) -> _Pools:
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = _Pools(threads)
        return _POOLS[threads]


class _Clock:
    """Seconds per stage, added from any thread: wall seconds under the stage's name (summed
    over threads), and for the stages that run on the pools the CPU seconds of the thread as
    well (``<stage>_cpu``), which other load on the machine does not inflate."""

    def __init__(self):
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._lock = threading.Lock()

    def add(self, **seconds: float) -> None:
        with self._lock:
            for stage, value in seconds.items():
                self.seconds[stage] += value


# ------------------------------------------------------------------------------ decoding

@dataclass
class _Batch:
    pixels: object              # uint8 [n_ok, S, S, 3]: numpy (Pillow) or a tensor on the device
    ok_rows: list[int]
    sizes: list[tuple[int, int]]
    problems: list[tuple[int, str]]


def _decode_one(path: str, size: int, clock: _Clock, options: dict | None = None):
    times: dict = {}
    try:
        array, original = load_rgb(path, size, times, options)
    except ImageProblem as exc:
        return exc
    clock.add(**times)
    return array, original


class _PillowBatch:
    """A batch's images decoded one per thread."""

    def __init__(self, pools: _Pools, paths: list[str], rows: range, size: int, clock: _Clock,
                 options: dict | None = None):
        self.rows, self.paths, self.size = rows, paths, size
        self.futures = [pools.decode.submit(_decode_one, paths[row], size, clock, options)
                        for row in rows]

    def result(self) -> _Batch:
        pixels, ok_rows, sizes, problems = [], [], [], []
        for row, future in zip(self.rows, self.futures):
            value = future.result()
            if isinstance(value, ImageProblem):
                problems.append((row, f"{self.paths[row]}: {value}"))
                sizes.append((0, 0))
                continue
            pixels.append(value[0])
            ok_rows.append(row)
            sizes.append(value[1])
        stacked = np.stack(pixels) if pixels else np.zeros((0, self.size, self.size, 3), np.uint8)
        return _Batch(stacked, ok_rows, sizes, problems)

    def cancel(self) -> None:
        for future in self.futures:
            future.cancel()


class _TorchvisionBatch:
    """A batch's JPEG files decoded together by torchvision on the device and resized there
    (antialiased bilinear, as Pillow's); Pillow takes every other file and any the device
    decoder rejects."""

    def __init__(self, pools: _Pools, paths: list[str], rows: range, size: int, clock: _Clock,
                 device: str, options: dict | None = None):
        self.future = pools.decode.submit(_decode_torchvision, paths, rows, size, clock, device,
                                          options)

    def result(self) -> _Batch:
        return self.future.result()

    def cancel(self) -> None:
        self.future.cancel()


def _decode_torchvision(paths: list[str], rows: range, size: int, clock: _Clock, device: str,
                        options: dict | None = None) -> _Batch:
    import warnings

    import torch

    from torchvision.io import ImageReadMode, decode_jpeg

    started, started_cpu = time.perf_counter(), time.thread_time()
    images: dict[int, torch.Tensor] = {}
    sizes: dict[int, tuple[int, int]] = {}
    problems: list[tuple[int, str]] = []
    jpegs: dict[int, torch.Tensor] = {}
    for row in rows:
        if is_url(paths[row]):
            continue                      # read by Pillow below, with the storage options
        try:
            with open(paths[row], "rb") as handle:
                data = handle.read()
        except OSError:
            data = b""
        if data[:3] == b"\xff\xd8\xff":
            jpegs[row] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if jpegs:
        # torchvision 0.29 marks its decoders deprecated in favour of torchcodec; they still work
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                decoded = decode_jpeg(list(jpegs.values()), mode=ImageReadMode.RGB, device=device)
            except Exception:  # noqa: BLE001 — one bad file fails the batch: one by one, then Pillow
                decoded = []
                for data in jpegs.values():
                    try:
                        decoded.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                    except Exception:  # noqa: BLE001 — Pillow decides below, with its reason
                        decoded.append(None)
        for row, image in zip(jpegs, decoded):
            if image is not None:
                images[row] = image
                sizes[row] = (int(image.shape[2]), int(image.shape[1]))
    decoded_at, decoded_cpu = time.perf_counter(), time.thread_time()
    resized = {row: _resize_on_device(image, size) for row, image in images.items()}
    clock.add(decode=decoded_at - started, resize=time.perf_counter() - decoded_at,
              decode_cpu=decoded_cpu - started_cpu, resize_cpu=time.thread_time() - decoded_cpu)
    for row in rows:                      # not a JPEG, or rejected: Pillow, as the CPU path
        if row in resized:
            continue
        value = _decode_one(paths[row], size, clock, options)
        if isinstance(value, ImageProblem):
            problems.append((row, f"{paths[row]}: {value}"))
            continue
        resized[row] = torch.tensor(value[0], device=device)
        sizes[row] = value[1]
    ok_rows = [row for row in rows if row in resized]
    pixels = (torch.stack([resized[row] for row in ok_rows]) if ok_rows
              else torch.zeros((0, size, size, 3), dtype=torch.uint8, device=device))
    return _Batch(pixels, ok_rows, [sizes.get(row, (0, 0)) for row in rows], problems)


def _resize_on_device(image, size: int):
    """uint8 [3, H, W] → uint8 [size, size, 3], antialiased bilinear (Pillow's BILINEAR)."""
    import torch
    import torch.nn.functional as F

    out = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                        align_corners=False, antialias=True)
    return out[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()


# ------------------------------------------------------------------------- the shard loop

class _Levels:
    """Where a shard's level values go: streamed shard files (the usual case), or, for a store
    layout ``ShardFile`` does not handle, whole-shard arrays written by zarr-python at the end."""

    def __init__(self, store: ImageFeatureStore, shard: int, count: int, spec, pools: _Pools,
                 clock: _Clock):
        self.store, self.shard, self.pools, self.clock = store, shard, pools, clock
        self.zeros = [np.zeros((spec.grid, spec.grid, level.channels), np.float16)
                      for level in spec.levels]
        try:
            self.files = [ShardFile(level, shard) for level in store.levels]
            self.arrays = None
        except UnsupportedLayout:
            self.files = None
            self.arrays = [np.zeros((count,) + zero.shape, np.float16) for zero in self.zeros]
        self.in_flight: collections.deque = collections.deque()

    def add(self, rows: range, values: list[np.ndarray | None]) -> None:
        """Row ``rows[i]``'s value of level k is ``values[k][i]`` (None: zeros)."""
        if self.arrays is not None:
            for array, level in zip(self.arrays, values):
                for i, row in enumerate(rows):
                    if level[i] is not None:
                        array[row] = level[i]
            return
        encoded = [[self.pools.encode.submit(self._encode, file, level[i] if level[i] is not None else zero)
                    for i in range(len(rows))]
                   for file, level, zero in zip(self.files, values, self.zeros)]
        self.in_flight.append(self.pools.write.submit(self._append, encoded))

    def wait(self, keep: int) -> None:
        """Wait until at most ``keep`` batches are still being encoded or written."""
        while len(self.in_flight) > keep:
            self.in_flight.popleft().result()

    def finish(self, status: np.ndarray, reasons: list[str], sizes: np.ndarray) -> None:
        if self.arrays is not None:
            started = time.perf_counter()
            self.store.write_shard(self.shard, self.arrays, status, reasons, sizes)
            self.clock.add(write=time.perf_counter() - started)
            return
        self.wait(0)
        started = time.perf_counter()
        for file in self.files:
            file.finish()
        written = time.perf_counter()
        self.store.finish_shard(self.shard, status, reasons, sizes)
        self.clock.add(write=written - started, records=time.perf_counter() - written)

    def discard(self) -> None:
        for future in self.in_flight:
            future.cancel()
        for future in self.in_flight:
            if not future.cancelled():
                concurrent.futures.wait([future])
        for file in self.files or []:
            file.discard()

    def _encode(self, file: ShardFile, values: np.ndarray):
        started, started_cpu = time.perf_counter(), time.thread_time()
        parts = file.encode(values)
        self.clock.add(compress=time.perf_counter() - started,
                       compress_cpu=time.thread_time() - started_cpu)
        return parts

    def _append(self, encoded: list[list[concurrent.futures.Future]]) -> None:
        for file, futures in zip(self.files, encoded):
            for future in futures:
                parts = future.result()
                started, started_cpu = time.perf_counter(), time.thread_time()
                file.append(parts)
                self.clock.add(write=time.perf_counter() - started,
                               write_cpu=time.thread_time() - started_cpu)


def _check_finite(outputs, backbone: str, shard: int) -> None:
    """float16 holds values up to 65504; a forward that went past it is not stored."""
    import torch

    if not all(bool(torch.isfinite(out).all()) for out in outputs):
        raise ExtractionSettingError(f"{backbone} overflowed float16 in shard {shard} (values past "
                                     f"65504 or NaN): extract with --dtype bfloat16 or float32")


def _extract_shard(store_path: Location | str, shard: int, inputs: ShardInputs, key: BackboneKey,
                   batch_size: int, result: ShardResult) -> None:
    import torch

    model = get_model(key)
    device = resolve_device(key.device)    # "auto" on a cluster: this worker's GPU, if any
    spec = model.spec
    size = spec.input_size
    paths = inputs.paths
    count = len(paths)
    clock = _Clock()
    pools = _pools(max(1, inputs.threads or key.torch_threads))
    status = np.full(count, OK, np.uint8)
    reasons = [""] * count
    sizes = np.zeros((count, 2), np.int32)
    batches = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]

    def decode(rows: range):
        if inputs.decoder == "torchvision":
            return _TorchvisionBatch(pools, paths, rows, size, clock, device, inputs.options)
        return _PillowBatch(pools, paths, rows, size, clock, inputs.options)

    store = ImageFeatureStore.open(store_path, mode="r+")   # writes every chunk (store.every_chunk)
    levels = _Levels(store, shard, count, spec, pools, clock)
    pending = collections.deque(decode(rows) for rows in batches[:AHEAD])
    try:
        for index, rows in enumerate(batches):
            started = time.perf_counter()
            batch = pending.popleft().result()
            result.read_seconds += time.perf_counter() - started
            if index + AHEAD < len(batches):
                pending.append(decode(batches[index + AHEAD]))
            for row, reason in batch.problems:
                status[row], reasons[row] = FAILED, reason
                result.failed.append((row, reason))
            for row, wh in zip(rows, batch.sizes):
                sizes[row] = wh
            values: list[list] = [[None] * len(rows) for _ in spec.levels]
            if batch.ok_rows:
                started = time.perf_counter()
                pixels = batch.pixels
                if not isinstance(pixels, torch.Tensor):
                    pixels = torch.from_numpy(pixels)
                    if device.startswith("cuda"):
                        pixels = pixels.pin_memory().to(device, non_blocking=True)
                with torch.inference_mode():
                    outputs = model(pixels)
                    if getattr(key, "dtype", None) == "float16":
                        _check_finite(outputs, spec.name, shard)
                forward = time.perf_counter()
                with torch.inference_mode():   # float16 on the device: half the bytes to copy
                    outputs = [out.to(torch.float16).cpu().numpy() for out in outputs]
                done = time.perf_counter()
                clock.add(forward=forward - started, cast=done - forward)
                result.compute_seconds += done - started
                for level, out in zip(values, outputs):
                    for j, row in enumerate(batch.ok_rows):
                        level[row - rows.start] = out[j]
            started = time.perf_counter()
            levels.add(rows, values)
            levels.wait(AHEAD)
            result.write_seconds += time.perf_counter() - started
        started = time.perf_counter()
        levels.finish(status, reasons, sizes)
        result.write_seconds += time.perf_counter() - started
    except BaseException:
        for batch in pending:
            batch.cancel()
        levels.discard()
        raise
    finally:
        result.stages = dict(clock.seconds)
