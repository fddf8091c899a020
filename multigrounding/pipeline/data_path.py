"""What the extraction's data path costs, which codec pays per level, and the estimate that
``cache plan`` prints before any work.

On a GPU machine the cores (decoding, resizing, compressing) or the disk (writing), not the
GPU, set the pace of an extraction (README, "What limits extraction"). ``FIGURES`` are the
per-level costs measured by ``benchmarks/bench_data_path.py`` on real features (photos of COCO
39769; efficientnet_lite0 with its ImageNet weights, vgg16 and pnasnet5large with random ones,
as no other weights load offline): per codec, the compression ratio and the CPU milliseconds
per image on one core, crc32c included. From them ``choose_codecs`` picks, per backbone, the
codec of each level that makes the data path fastest on a reference GPU machine (16 cores, a
1 GB/s disk): the store's codecs are part of its fingerprint, so the choice must not depend on
the machine a run happens on, or a resumed run would be refused.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from multigrounding.cache.location import is_url

# bench_data_path.py, 2026-11-30 (2 cores, AMD EPYC VM): {backbone: per level {codec: (ratio, CPU ms)}}
FIGURES: dict[str, tuple[dict[str, tuple[float, float]], ...]] = {
    "vgg16": (
        {"none": (1.0, 0.017), "lz4": (1.031, 0.283), "zstd1": (1.484, 1.111)},
        {"none": (1.0, 0.018), "lz4": (1.024, 0.263), "zstd1": (1.459, 1.043)},
        {"none": (1.0, 0.017), "lz4": (1.112, 0.493), "zstd1": (1.743, 1.157)},
        {"none": (1.0, 0.016), "lz4": (1.108, 0.443), "zstd1": (1.749, 1.098)}),
    "pnasnet5large": (
        {"none": (1.0, 0.080), "lz4": (1.003, 0.818), "zstd1": (1.070, 1.938)},
        {"none": (1.0, 0.083), "lz4": (1.020, 0.913), "zstd1": (1.089, 1.987)},
        {"none": (1.0, 0.256), "lz4": (1.135, 2.551), "zstd1": (1.139, 3.500)},
        {"none": (1.0, 0.156), "lz4": (1.420, 3.142), "zstd1": (1.248, 3.983)}),
    "efficientnet_lite0": (
        {"none": (1.0, 0.005), "lz4": (0.999, 0.015), "zstd1": (1.084, 0.044)},
        {"none": (1.0, 0.006), "lz4": (1.000, 0.029), "zstd1": (1.085, 0.124)},
        {"none": (1.0, 0.014), "lz4": (1.000, 0.059), "zstd1": (1.084, 0.277)},
        {"none": (1.0, 0.046), "lz4": (2.202, 1.892), "zstd1": (4.793, 1.968)}),
}
DECODE_MS = 3.3          # a 640x480 JPEG decoded and resized to 299, one core (the same run)
REFERENCE_CORES = 16
REFERENCE_DISK = 1e9     # bytes/s
FALLBACK = "zstd1"       # a backbone without figures
TIE = 0.02               # relative: the figures' own spread is larger than this


def raw_bytes(grid: int, channels: Sequence[int]) -> list[int]:
    """float16 bytes per image of each level."""
    return [grid * grid * c * 2 for c in channels]


def choose_codecs(backbone: str, levels: int, cores: int = REFERENCE_CORES,
                  disk: float = REFERENCE_DISK, grid_bytes: Sequence[int] | None = None) -> tuple[str, ...]:
    """Per level, the codec that minimises the data path's time per image (the larger of CPU
    over ``cores`` and bytes over ``disk``) by the measured FIGURES; zstd 1 without figures."""
    figures = FIGURES.get(backbone)
    if figures is None or len(figures) != levels or grid_bytes is None:
        return (FALLBACK,) * levels
    options = []
    for combo in itertools.product(*[sorted(level) for level in figures]):
        cpu = DECODE_MS + sum(level[c][1] for level, c in zip(figures, combo))
        size = sum(raw / level[c][0] for raw, level, c in zip(grid_bytes, figures, combo))
        options.append((max(cpu / 1e3 / cores, size / disk), size, cpu, combo))
    fastest = min(option[0] for option in options)
    # within TIE of the fastest the figures cannot tell the options apart: the smallest store
    # wins, then the least CPU
    return min((round(size), cpu, combo) for seconds, size, cpu, combo in options
               if seconds <= fastest * (1 + TIE))[2]


@dataclass
class DataPathEstimate:
    """``cache plan``'s numbers: bytes after the codecs, and the data path's time on this machine."""

    images: int
    codecs: list[str]
    bytes_per_image: float          # after compression, by the measured ratios (or raw)
    decode_ms: float | None         # measured now, CPU ms per image (decode + resize)
    decode_sample: int
    encode_ms: float                # measured figures, CPU ms per image on one core
    cores: int
    disk_bytes_per_s: float | None  # measured now at the cache's place (write + fsync)
    figures_known: bool

    @property
    def total_bytes(self) -> float:
        return self.bytes_per_image * self.images

    def seconds(self) -> tuple[float, str]:
        """(seconds, what limits): the data path alone, the model's forward not counted."""
        cpu = ((self.decode_ms or DECODE_MS) + self.encode_ms) / 1e3 * self.images / self.cores
        if self.disk_bytes_per_s is None:
            return cpu, "cores"
        disk = self.total_bytes / self.disk_bytes_per_s
        return (cpu, "cores") if cpu >= disk else (disk, "disk")


def measure_decode(paths: Sequence[str], size: int, sample: int = 8) -> tuple[float | None, int]:
    """CPU ms per image to decode and resize up to ``sample`` of ``paths`` (spread over them)."""
    from multigrounding.datasets.images import ImageProblem, load_rgb

    if not paths:
        return None, 0
    step = max(1, len(paths) // sample)
    chosen = list(paths[::step])[:sample]
    spent, done = 0.0, 0
    for path in chosen:
        started = time.thread_time()
        try:
            load_rgb(path, size)
        except ImageProblem:
            continue
        spent += time.thread_time() - started
        done += 1
    return (spent / done * 1e3 if done else None), done


def measure_disk(folder: str | Path, size: int = 64 << 20) -> float | None:
    """Bytes/s of a sequential write that reaches the disk (fsync) in the nearest existing folder
    at or above ``folder``; the file is removed. None if nothing can be written there."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    block = os.urandom(4 << 20)
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".mg-disk-probe-") as handle:
            started = time.perf_counter()
            for _ in range(max(1, size // len(block))):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
            return max(1, size // len(block)) * len(block) / (time.perf_counter() - started)
    except OSError:
        return None


def estimate(paths: Sequence[str], backbone: str, grid: int, channels: Sequence[int],
             input_size: int, codecs: Sequence[str], cache: str | Path | None = None,
             sample: int = 8) -> DataPathEstimate:
    """The store's bytes and the data path's time, before any work (see DataPathEstimate)."""
    raws = raw_bytes(grid, channels)
    figures = FIGURES.get(backbone)
    known = figures is not None and len(figures) == len(raws)
    if known:
        size = sum(raw / level[c][0] for raw, level, c in zip(raws, figures, codecs))
        encode = sum(level[c][1] for level, c in zip(figures, codecs))
    else:
        size, encode = float(sum(raws)), 0.0
    decode, decoded = measure_decode(paths, input_size, sample)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    disk = measure_disk(cache) if cache is not None and not is_url(cache) else None
    return DataPathEstimate(len(paths), list(codecs), size, decode, decoded, encode, cores, disk, known)


def free_bytes(cache: str | Path) -> int:
    probe = Path(cache)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free
