"""Random batches of cached features, read fast and strictly.

zarr-python's integer-array indexing on sharded arrays is ~50x slower than it should be
(zarr-python#3829), so batches are read with tensorstore's ``zarr3`` driver over the same
files: one indexed read per level, all levels issued at once and awaited together.

Reads are strict: a reader refuses a store whose finished shards lost files, and a chunk that is
missing or fails its checksum raises ``CacheDamagedError`` naming the store, the array and the
image, never zeros (``ShardedStore.tensorstore``).

Most of a batch read is decompressing the chunks, again every epoch. ``chunk_cache(bytes)`` is
one tensorstore cache pool of that size (decoded chunks, least recently used dropped first),
which a visual and a text reader may share (``cache=``; ``cache_bytes`` makes a reader its own):
a dataset that fits is decoded once, and later epochs copy from memory (measured: a warm cache
reads at 0.6 of a memory-mapped raw array, a cold one at 0.13).

A store on an object store (a ``Location`` with a URL) is read the same way through
tensorstore's kvstore for its scheme (``s3``), and there the chunk cache matters more: a cold
batch is ~8x slower from S3 than from a local disk, a warm one costs no request at all
(benchmarks/README.md). Schemes tensorstore has no kvstore for are read through zarr-python
(``zarr_rows``), ~2.5x slower again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import tensorstore as ts

from multigrounding.cache.image_store import ImageFeatureStore
from multigrounding.cache.location import Location
from multigrounding.cache.store import read_rows
from multigrounding.cache.text_store import TextFeatureStore


def chunk_cache(cache_bytes: int) -> ts.Context | None:
    """A chunk cache of ``cache_bytes`` for readers to share (None: no cache)."""
    return ts.Context({"cache_pool": {"total_bytes_limit": int(cache_bytes)}}) if cache_bytes else None


class VisualBatchReader:
    """``reader.read(rows)`` → one float16 array [B, M, M, C_k] per level, rows in given order."""

    def __init__(self, path: str | Path | Location, cache_bytes: int = 0,
                 cache: ts.Context | None = None):
        self.store = ImageFeatureStore.open(path)
        self.store.check_complete()
        context = cache if cache is not None else chunk_cache(cache_bytes)
        self.names = [f"visual/level{k}" for k in range(len(self.store.levels))]
        self.levels = [self.store.tensorstore(name, context) for name in self.names]

    def __len__(self) -> int:
        return self.store.num_images

    def read(self, rows: Sequence[int]) -> list[np.ndarray]:
        index = np.asarray(rows, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= self.store.num_images):
            raise IndexError(f"rows must be in [0, {self.store.num_images}); got "
                             f"{index.min()}..{index.max()}")
        futures = [level[index].read() for level in self.levels]
        out = []
        for name, level, future in zip(self.names, self.levels, futures):
            try:
                out.append(future.result())
            except ValueError:      # a missing or corrupt chunk: find and name it
                out.append(read_rows(self.store, name, index, view=level))
        return out


class TextBatchReader:
    """``reader.read(rows)`` → padded word layers, mask and sentence vectors of those sequences.

    A sequence's words are contiguous rows of the flat ``tokens`` array, so a batch is one
    indexed tensorstore read of all their rows, then padded to the longest sequence.
    """

    def __init__(self, path: str | Path | Location, cache_bytes: int = 0,
                 cache: ts.Context | None = None):
        self.store = TextFeatureStore.open(path)
        self.store.check_complete()
        self.start, length = self.store.sequence_spans()
        self.length = length.astype(np.int64)
        context = cache if cache is not None else chunk_cache(cache_bytes)
        self.tokens = self.store.tensorstore("tokens", context)
        self.sentence = self.store.tensorstore("sentence", context)

    def __len__(self) -> int:
        return len(self.start)

    def read(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [B, T, layers, dim] float16 zero-padded, mask [B, T] bool, sentence [B, S, dim])."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.length[rows]
        index = np.concatenate([np.arange(self.start[r], self.start[r] + n)
                                for r, n in zip(rows, lengths)]) if len(rows) else np.zeros(0, np.int64)
        tokens_future = self.tokens[index].read()
        sentence_future = self.sentence[rows].read()
        try:
            flat = tokens_future.result()
        except ValueError:
            flat = read_rows(self.store, "tokens", index, view=self.tokens,
                             describe=self.store.token_owner)
        try:
            sentence = sentence_future.result()
        except ValueError:
            sentence = read_rows(self.store, "sentence", rows, view=self.sentence)
        width = int(lengths.max()) if len(rows) else 0
        mask = np.arange(width)[None, :] < lengths[:, None]
        tokens = np.zeros((len(rows), width) + flat.shape[1:], dtype=flat.dtype)
        tokens[mask] = flat
        return tokens, mask, sentence
