"""Random rows of sharded zarr arrays read with zarr-python, for stores tensorstore cannot reach.

zarr-python's integer-array indexing on sharded arrays is ~50x slower than it should be
(zarr-python#3829), so each (array, row) is its own ``getitem`` and all of them are awaited
together: on an object store the requests go out concurrently. Measured on a moto S3 server
(benchmarks/OBJECT_STORE_NOTES.md) this is ~3x slower than tensorstore's ``zarr3`` driver and
reads ~1.09x the bytes (every row re-reads its shard's index); use it only where
``Location.kvstore_spec`` is None.
"""
from __future__ import annotations

import asyncio
from typing import Sequence

import numpy as np


def read_rows(arrays: Sequence, rows: Sequence[int]) -> list[np.ndarray]:
    """``rows`` (in the given order) of each zarr array along axis 0, one array per input."""
    from zarr.core.sync import sync

    rows = [int(r) for r in rows]
    for array in arrays:
        if rows and (min(rows) < 0 or max(rows) >= array.shape[0]):
            raise IndexError(f"rows must be in [0, {array.shape[0]}); got "
                             f"{min(rows)}..{max(rows)}")
    if not rows:
        return [np.zeros((0,) + tuple(array.shape[1:]), dtype=array.dtype) for array in arrays]
    parts = sync(_gather([array._async_array for array in arrays], rows))
    n = len(rows)
    return [np.concatenate(parts[k * n:(k + 1) * n]) for k in range(len(arrays))]


async def _gather(arrays, rows: list[int]) -> list[np.ndarray]:
    return await asyncio.gather(*[array.getitem((slice(r, r + 1),))
                                  for array in arrays for r in rows])


class ZarrRowsView:
    """The part of a tensorstore view the readers use (``view[index].read().result()``), over a
    zarr-python array, for locations tensorstore has no kvstore for. Failures to read come back
    as ValueError, as tensorstore's do, so the readers name the damaged row the same way."""

    def __init__(self, array):
        self.array = array
        self.shape = tuple(array.shape)
        self.dtype = array.dtype

    def __getitem__(self, index) -> "_Read":
        return _Read(self.array, index)


class _Read:
    """``.read()`` → itself; ``.result()`` reads (rows by ``read_rows``, a slice as one read)."""

    def __init__(self, array, index):
        self.array, self.index = array, index

    def read(self) -> "_Read":
        return self

    def result(self) -> np.ndarray:
        try:
            if isinstance(self.index, slice):
                return self.array[self.index]
            return read_rows([self.array], np.asarray(self.index).reshape(-1))[0]
        except IndexError:
            raise
        except Exception as exc:  # a checksum or decode failure, or a lost object
            raise ValueError(f"{type(exc).__name__}: {exc}") from None
