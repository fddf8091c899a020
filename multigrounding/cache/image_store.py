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

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from multigrounding.cache.store import Header, ShardedStore

KIND = "images"
PENDING, OK, FAILED = 0, 1, 2
# zstd 1, not 3: on these features it is both faster and smaller (2.46x vs 2.38x on synthetic
# images, 2.64x vs 2.54x on photos; benchmarks/README.md)
ZSTD_LEVEL = 1


@dataclass(frozen=True)
class LevelShape:
    name: str
    channels: int


class ImageFeatureStore(ShardedStore):
    """Reading and writing one visual feature store (see the module docstring for the layout).

    ``create_or_resume(path, config, ids)`` takes the manifest ids as its layout."""

    KIND = KIND

    def __init__(self, path: str | Path, group: zarr.Group, header: Header):
        self.levels = [group[f"visual/level{k}"] for k in range(len(header.config["levels"]))]
        super().__init__(path, group, header)
        self.num_images = self.num_items
        self.grid = int(self.config["grid"])

    def _count_items(self) -> int:
        return self.levels[0].shape[0]

    @classmethod
    def _allocate(cls, group: zarr.Group, config: dict, ids: list[str]) -> None:
        _allocate(group, config, ids)

    def write_shard(self, shard: int, features: list[np.ndarray], status: np.ndarray,
                    failures: list[str], sizes: np.ndarray) -> None:
        """Write every array's part of one shard, then its done flag (worker side)."""
        rows = self.shard_slice(shard)
        for level, values in zip(self.levels, features):
            level[rows] = values
        self.group["status"][rows] = status
        self.group["failure"][rows] = np.array(failures, dtype=object).astype(str)
        self.group["original_size"][rows] = sizes
        self.group["done"][shard] = 1

    # ------------------------------------------------------------------ reading
    @property
    def ids(self) -> np.ndarray:
        return self.group["image_ids"][:]

    def status(self) -> np.ndarray:
        return self.group["status"][:]

    def original_sizes(self) -> np.ndarray:
        return self.group["original_size"][:]

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
        return sum(self.grid * self.grid * lv["channels"] * 2 for lv in self.config["levels"])


def _allocate(group: zarr.Group, config: dict, ids: list[str]) -> None:
    """Create every array of a new store (no data written but the ids)."""
    n, grid, shard = len(ids), int(config["grid"]), int(config["shard_size"])
    shards = -(-n // shard)
    compressor = ZstdCodec(level=ZSTD_LEVEL)
    visual = group.create_group("visual")
    for k, level in enumerate(config["levels"]):
        shape = (n, grid, grid, int(level["channels"]))
        visual.create_array(f"level{k}", shape=shape, dtype="float16",
                            chunks=(1,) + shape[1:], shards=(shard,) + shape[1:],
                            compressors=compressor, fill_value=0)
    group.create_array("image_ids", shape=(n,), dtype=str, chunks=(max(n, 1),))
    group["image_ids"][:] = np.array(ids, dtype=object).astype(str)
    group.create_array("status", shape=(n,), dtype="uint8", chunks=(shard,), fill_value=PENDING)
    group.create_array("failure", shape=(n,), dtype=str, chunks=(shard,))
    group.create_array("original_size", shape=(n, 2), dtype="int32", chunks=(shard, 2),
                       fill_value=0)
    group.create_array("done", shape=(shards,), dtype="uint8", chunks=(1,), fill_value=0)
