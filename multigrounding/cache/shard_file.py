"""One whole zarr v3 shard written as it is computed: chunks encoded in parallel, appended in
order, the index last.

zarr-python writes a shard by assembling every encoded chunk in memory once the whole shard's
array is there, then writing it in one go: the encoding cannot start before the last image is
computed, and the shard's array, its encoded chunks and their concatenation are all in memory
at once. A store shard here holds one inner chunk per row (one image of one level), so the
shard file can be built as the rows arrive instead: each chunk is encoded (``encode``, safe to
call from many threads; numcodecs and crc32c release the GIL) and appended in row order
(``append``), on a local disk straight into the shard's temporary file; ``finish`` appends the
shard index and moves the file into place. The bytes are exactly those zarr-python writes for
the same values (tests/test_shard_file.py compares them), so every reader, repair and verify
path is unchanged.

Only the layouts this package creates are handled: one row per inner chunk, the ``bytes``
codec (little-endian or single-byte), then any of ``zstd``, ``blosc`` and ``crc32c``, and the
index at the end with ``bytes`` + ``crc32c``. ``ShardFile.supports(array)`` says whether an
array qualifies; the caller writes anything else through zarr-python.
"""
from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path
from typing import Sequence

import google_crc32c
import numpy as np
import zarr
from zarr.core.sync import sync

EMPTY = 2**64 - 1     # the index entry of a chunk that is not stored
Parts = tuple         # the encoded bytes of one chunk, as buffers to write one after the other


def _codec_dicts(array: zarr.Array) -> list[dict] | None:
    codecs = [codec.to_dict() for codec in array.metadata.codecs]
    if len(codecs) != 1 or codecs[0]["name"] != "sharding_indexed":
        return None
    return codecs


class ChunkCodec:
    """The inner codecs of a sharded array, applied with the same libraries zarr uses."""

    def __init__(self, stages: list, dtype: np.dtype):
        self.stages = stages       # ("zstd" | "blosc", numcodecs codec) or ("crc32c", None)
        self.dtype = dtype

    @classmethod
    def from_codecs(cls, codecs: Sequence[dict], dtype: np.dtype) -> "ChunkCodec | None":
        import numcodecs

        if not codecs or codecs[0]["name"] != "bytes":
            return None
        endian = (codecs[0].get("configuration") or {}).get("endian")
        if dtype.itemsize > 1 and endian != sys.byteorder:
            return None
        stages = []
        for codec in codecs[1:]:
            name, config = codec["name"], codec.get("configuration") or {}
            if name == "zstd":
                stages.append(("zstd", numcodecs.Zstd(level=config["level"],
                                                      checksum=config.get("checksum", False))))
            elif name == "blosc":
                shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[config["shuffle"]]
                stages.append(("blosc", numcodecs.Blosc.from_config(
                    {"cname": config["cname"], "clevel": config["clevel"], "shuffle": shuffle,
                     "blocksize": config["blocksize"], "typesize": config["typesize"]})))
            elif name == "crc32c":
                stages.append(("crc32c", None))
            else:
                return None
        return cls(stages, dtype)

    def encode(self, values: np.ndarray) -> Parts:
        """One chunk's stored bytes, as buffers (the raw values are not copied when stored raw).
        A chunk of zeros is stored too, as zarr does with ``write_empty_chunks`` (the stores'
        strict readers take a chunk missing from a shard for lost data)."""
        values = np.ascontiguousarray(values, dtype=self.dtype)
        parts: list = [values.reshape(-1).view(np.uint8)]
        for name, codec in self.stages:
            if name == "crc32c":
                crc = 0
                for part in parts:     # numpy arrays and bytes (not memoryviews) are taken
                    crc = google_crc32c.extend(crc, part)
                parts.append(np.array([crc], "<u4").tobytes())
            else:
                whole = parts[0] if len(parts) == 1 else np.frombuffer(b"".join(parts), np.uint8)
                parts = [codec.encode(np.asarray(whole).view(np.uint8) if name == "blosc" else whole)]
        return tuple(parts)


class UnsupportedLayout(ValueError):
    """An array this writer does not handle (write it with zarr-python)."""


class ShardFile:
    """Shard ``shard`` of ``array`` (every row of it), built row by row.

    ``encode(values)`` may run on any thread; ``append`` must be called for the shard's rows in
    order, from one thread at a time; ``finish`` stores the shard (nothing is visible under the
    shard's key before), ``discard`` drops it. On a local store the file is written as it grows
    (``<key>.<hex>.partial``, the temporary name zarr itself uses, removed on resume); on any
    other store the encoded chunks are kept and set in one request."""

    def __init__(self, array: zarr.Array, shard: int):
        codecs = _codec_dicts(array)
        if codecs is None:
            raise UnsupportedLayout(f"{array.path}: not a sharded array")
        config = codecs[0]["configuration"]
        chunk, shard_shape = tuple(config["chunk_shape"]), tuple(array.shards or ())
        if not shard_shape or chunk[0] != 1 or chunk[1:] != tuple(array.shape[1:]) or shard_shape[1:] != chunk[1:]:
            raise UnsupportedLayout(f"{array.path}: inner chunks are not single rows")
        if config.get("index_location", "end") != "end" or [c["name"] for c in config["index_codecs"]] != ["bytes", "crc32c"]:
            raise UnsupportedLayout(f"{array.path}: shard index layout not handled")
        self.codec = ChunkCodec.from_codecs(config["codecs"], np.dtype(array.dtype))
        if self.codec is None:
            raise UnsupportedLayout(f"{array.path}: codecs {config['codecs']} not handled")
        self.array = array
        self.rows_per_shard = shard_shape[0]
        start = shard * self.rows_per_shard
        self.rows = max(0, min(self.rows_per_shard, array.shape[0] - start))
        self.key = f"{array.path}/" + array.metadata.encode_chunk_key((shard,) + (0,) * (array.ndim - 1))
        self.index = np.full((self.rows_per_shard,) + (1,) * (array.ndim - 1) + (2,), EMPTY, "<u8")
        self.next_row = 0
        self.offset = 0
        self.bytes_written = 0
        store = array.store
        self._target: Path | None = None
        self._file = None
        self._parts: list = []
        if isinstance(store, zarr.storage.LocalStore):
            self._target = Path(store.root) / self.key
            self._temp = self._target.with_suffix(f".{uuid.uuid4().hex}.partial")

    @staticmethod
    def supports(array: zarr.Array) -> bool:
        try:
            ShardFile(array, 0)
        except UnsupportedLayout:
            return False
        return True

    def encode(self, values: np.ndarray) -> Parts:
        return self.codec.encode(values)

    def append(self, parts: Parts) -> None:
        """Store the next row's encoded chunk."""
        if self.next_row >= self.rows:
            raise IndexError(f"{self.key}: shard holds {self.rows} rows")
        length = sum(len(memoryview(p).cast("B")) for p in parts)
        self.index.reshape(-1, 2)[self.next_row] = (self.offset, length)
        self._write(parts)
        self.offset += length
        self.next_row += 1

    def finish(self) -> None:
        """Append the index and store the shard under its key."""
        if self.next_row != self.rows:
            raise ValueError(f"{self.key}: {self.next_row} of {self.rows} rows appended")
        index = self.index.tobytes()
        crc = np.array([google_crc32c.value(index)], "<u4").tobytes()
        self._write((index, crc))
        if self._target is None:
            from zarr.core.buffer import default_buffer_prototype

            data = b"".join(bytes(p) if not isinstance(p, bytes) else p for p in self._parts)
            self._parts = []
            sync(self.array.store.set(self.key, default_buffer_prototype().buffer.from_bytes(data)))
            return
        self._open().close()
        self._file = None
        os.replace(self._temp, self._target)

    def discard(self) -> None:
        """Drop what was written (a failed or interrupted shard leaves no file behind)."""
        self._parts = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._target is not None:
            self._temp.unlink(missing_ok=True)

    def _open(self):
        if self._file is None:
            self._target.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self._temp, "wb", buffering=0)
        return self._file

    def _write(self, parts: Parts) -> None:
        if self._target is None:
            self._parts.extend(parts)
        else:
            handle = self._open()
            for part in parts:
                view = memoryview(part).cast("B")
                while view:                    # a raw file may write less than asked
                    view = view[handle.write(view):]
        self.bytes_written += sum(len(memoryview(p).cast("B")) for p in parts)
