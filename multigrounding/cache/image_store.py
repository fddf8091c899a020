"""The visual feature store: four levels of [N, M, M, C] float16 maps, written shard by shard.

Layout (one zarr v3 group):
  image_ids        (N,) str          the manifest ids, in manifest order (driver, at creation)
  visual/level{k}  (N, M, M, C_k)    float16, one image per inner chunk, ``shard_size`` per shard
  status           (N,) uint8        0 pending, 1 ok, 2 failed (its rows are zeros: mask them)
  failure          (N,) str          why an image failed, "" otherwise
  original_size    (N, 2) int32      the image file's (width, height)
  done             (n_shards,) uint8 1 once every array of the shard is written; its own chunks

zarr has no locks, so a shard is the unit of work, retry and completion: one task writes whole
shards of every per-image array (status, failure, original_size are chunked by shard too) and
sets ``done`` last. Resuming skips done shards.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from multigrounding.cache.store import (CacheDamagedError, Header, ShardedStore, VerifyReport,
                                        compressors, every_chunk, read_rows)

KIND = "images"
PENDING, OK, FAILED = 0, 1, 2
# zstd 1, not 3: on these features it is both faster and smaller (2.46x vs 2.38x on synthetic
# images, 2.64x vs 2.54x on photos; benchmarks/README.md)
ZSTD_LEVEL = 1
# What a visual level can be stored with; every one ends in a crc32c checksum per chunk (format 2).
# "lz4" is blosc's lz4 after a byte shuffle of the float16 values (zarr v3 has no bare lz4 codec;
# tensorstore reads blosc). Which pays depends on the machine: benchmarks/bench_data_path.py.
LEVEL_CODECS = ("none", "lz4", "zstd1")


def level_compressors(codec: str) -> tuple:
    """The zarr compressors of a visual level stored with ``codec`` (one of LEVEL_CODECS)."""
    if codec == "none":
        return (Crc32cCodec(),)
    if codec == "lz4":
        return (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2), Crc32cCodec())
    if codec == "zstd1":
        return compressors(1)
    raise ValueError(f"unknown level codec {codec!r}: choose {', '.join(LEVEL_CODECS)}")


@dataclass(frozen=True)
class LevelInfo:
    """One cached level: the backbone's name for it, the module tapped, channels and stride."""

    name: str
    module: str
    channels: int
    stride: int


# what every store meant before its header recorded these keys
AS_BEFORE = {"compute_dtype": "float32", "decoder": "pillow"}


@dataclass
class ImageStoreConfig:
    """A visual store's config, as its header records it (``to_json`` keeps the key order, so
    the header's bytes do not change). ``weights`` is the backbone's weights record:
    ``weights`` (imagenet | random | file), ``record``, ``source``, ``sha256``, ``seed``,
    ``normalisation`` and, for downloaded files, ``file``. The last three keys, ``codecs`` (one
    of LEVEL_CODECS per level), ``compute_dtype`` (the backbone's, before float16) and
    ``decoder`` (pillow | torchvision), are recorded only where they differ from what every store
    meant before they existed (zstd on every level, float32, Pillow), so those stores resume and
    compare equal to new ones made the same way."""

    manifest_path: str
    manifest: dict                  # {"sha256": ..., "images": N}
    backbone: str
    weights: dict
    levels: list[LevelInfo]
    grid: int
    input_size: int
    resize: str
    dtype: str
    shard_size: int
    versions: dict
    codecs: list[str] | None = None
    compute_dtype: str | None = None
    decoder: str | None = None

    @classmethod
    def from_json(cls, data: dict) -> "ImageStoreConfig":
        fields = {**AS_BEFORE, **data, "levels": [LevelInfo(**level) for level in data["levels"]]}
        return cls(**fields)

    def to_json(self) -> dict:
        data = {"manifest_path": self.manifest_path, "manifest": self.manifest,
                "backbone": self.backbone, "weights": self.weights,
                "levels": [dataclasses.asdict(level) for level in self.levels],
                "grid": self.grid, "input_size": self.input_size, "resize": self.resize,
                "dtype": self.dtype, "shard_size": self.shard_size, "versions": self.versions}
        if self.codecs is not None and any(codec != "zstd1" for codec in self.codecs):
            data["codecs"] = self.codecs
        for key in ("compute_dtype", "decoder"):
            if getattr(self, key) not in (None, AS_BEFORE[key]):
                data[key] = getattr(self, key)
        return data

    @property
    def manifest_sha256(self) -> str:
        return self.manifest["sha256"]

    @property
    def level_names(self) -> list[str]:
        return [level.name for level in self.levels]

    @property
    def channels(self) -> list[int]:
        return [level.channels for level in self.levels]

    def identity(self) -> dict:
        """What makes two stores' features comparable: the model, its weights, the levels."""
        return {"backbone": self.backbone, "weights": self.weights.get("weights"),
                "weights_sha256": self.weights.get("sha256"), "seed": self.weights.get("seed"),
                "levels": self.level_names, "grid": self.grid, "input_size": self.input_size}


@dataclass
class ImageLayout:
    """What the manifest alone decides about a visual store: the images, in manifest order."""

    image_ids: list[str]
    paths: list[str]


class ImageFeatureStore(ShardedStore):
    """Reading and writing one visual feature store (see the module docstring for the layout).

    ``create_or_resume(path, config, layout)`` takes an ImageLayout."""

    KIND = KIND
    CONFIG = ImageStoreConfig
    UNIT = "images"

    def __init__(self, path: str | Path, group: zarr.Group, header: Header):
        count = len(header.config["levels"])
        self.levels = [group[f"visual/level{k}"] for k in range(count)]
        self.PER_SHARD_ARRAYS = tuple(f"visual/level{k}" for k in range(count)) + (
            "status", "failure", "original_size")
        super().__init__(path, group, header)
        self.num_images = self.num_items
        self.grid = int(self.config.grid)

    def _count_items(self) -> int:
        return self.levels[0].shape[0]

    @classmethod
    def _allocate(cls, group: zarr.Group, config: ImageStoreConfig, layout: ImageLayout) -> None:
        _allocate(group, config, layout.image_ids)

    def write_shard(self, shard: int, features: list[np.ndarray], status: np.ndarray,
                    failures: list[str], sizes: np.ndarray) -> None:
        """Write every array's part of one shard, then its done flag (worker side)."""
        rows = self.shard_slice(shard)
        for level, values in zip(self.levels, features):
            every_chunk(level)[rows] = values
        self.finish_shard(shard, status, failures, sizes)

    def finish_shard(self, shard: int, status: np.ndarray, failures: list[str],
                     sizes: np.ndarray) -> None:
        """Once the shard's levels are stored: its per-image records, then its done flag (every
        chunk written, even one equal to the fill value: a done shard has all its files)."""
        rows = self.shard_slice(shard)
        every_chunk(self.group["status"])[rows] = status
        every_chunk(self.group["failure"])[rows] = np.array(failures, dtype=object).astype(str)
        every_chunk(self.group["original_size"])[rows] = sizes
        every_chunk(self.group["done"])[shard] = 1

    # ------------------------------------------------------------------ reading
    @property
    def ids(self) -> np.ndarray:
        return self.group["image_ids"][:]

    def status(self) -> np.ndarray:
        return self.group["status"][:]

    def original_sizes(self) -> np.ndarray:
        return self.group["original_size"][:]

    def item_name(self, row: int) -> str:
        return f"image {self.group['image_ids'][row]} (row {row})"

    def usable(self) -> np.ndarray:
        """[N] bool: the images extracted without failure (failed rows are zeros: mask them)."""
        return self.status() == OK

    def failures(self) -> list[tuple[int, str, str]]:
        """(row, image id, reason) of every image that failed."""
        status = self.status()
        rows = np.flatnonzero(status == FAILED)
        if rows.size == 0:
            return []
        ids, reasons = self.ids, self.group["failure"][:]
        return [(int(r), str(ids[r]), str(reasons[r])) for r in rows]

    @property
    def bytes_per_image(self) -> int:
        return sum(self.grid * self.grid * channels * 2 for channels in self.config.channels)

    def progress(self) -> dict:
        status, done = self.status(), self.done_shards()
        return {"shards_done": int(done.sum()), "shards": self.num_shards,
                "images": self.num_images, "ok": int((status == OK).sum()),
                "failed": int((status == FAILED).sum()), "pending": int((status == PENDING).sum())}

    # ---------------------------------------------------------------- verifying
    def _check_layout(self, report: VerifyReport) -> None:
        for k, (level, declared) in enumerate(zip(self.levels, self.config.levels)):
            expected = (self.num_images, self.grid, self.grid, declared.channels)
            if level.shape != expected:
                report.problems.append(f"visual/level{k}: shape {level.shape}, config says {expected}")
            if level.dtype != np.float16:
                report.problems.append(f"visual/level{k}: dtype {level.dtype}, expected float16")
        self._status = self.status()

    def _check_shard(self, shard: int, rows: slice, report: VerifyReport) -> None:
        """Every chunk decodes (checksums hold), values finite, zero where an image failed."""
        status = self._status[rows]
        if (status == PENDING).any():
            report.problems.append(f"shard {shard}: marked done but has images without a status")
        for k in range(len(self.levels)):
            name = f"visual/level{k}"
            try:
                values = read_rows(self, name, np.arange(rows.start, rows.stop))
            except CacheDamagedError as exc:
                report.problems.append(exc.detail)
                continue
            flat = values.reshape(len(values), -1)
            for row in np.flatnonzero(~np.isfinite(flat).all(axis=1)):
                report.problems.append(f"{name} {self.item_name(rows.start + row)}: NaN or Inf values")
            for row in np.flatnonzero((status == FAILED) & flat.any(axis=1)):
                report.problems.append(f"{name} {self.item_name(rows.start + row)}: failed but not zero")


def _allocate(group: zarr.Group, config: ImageStoreConfig, ids: list[str]) -> None:
    """Create every array of a new store (no data written but the ids)."""
    n, grid, shard = len(ids), config.grid, config.shard_size
    shards = -(-n // shard)
    visual = group.create_group("visual")
    codecs = config.codecs or [None] * len(config.levels)
    for k, (level, codec) in enumerate(zip(config.levels, codecs)):
        shape = (n, grid, grid, level.channels)
        visual.create_array(f"level{k}", shape=shape, dtype="float16",
                            chunks=(1,) + shape[1:], shards=(shard,) + shape[1:],
                            compressors=level_compressors(codec) if codec else compressors(ZSTD_LEVEL),
                            fill_value=0)
    small = compressors(ZSTD_LEVEL)
    group.create_array("image_ids", shape=(n,), dtype=str, chunks=(max(n, 1),), compressors=small)
    group["image_ids"][:] = np.array(ids, dtype=object).astype(str)
    group.create_array("status", shape=(n,), dtype="uint8", chunks=(shard,), fill_value=PENDING,
                       compressors=small)
    group.create_array("failure", shape=(n,), dtype=str, chunks=(shard,), compressors=small)
    group.create_array("original_size", shape=(n, 2), dtype="int32", chunks=(shard, 2),
                       fill_value=0, compressors=small)
    group.create_array("done", shape=(shards,), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=small)
