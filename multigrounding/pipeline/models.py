"""One per-process cache of frozen models, for every kind of extraction task.

A task names its model by a key: a frozen, picklable dataclass with a ``build()`` method (a
backbone's, a text encoder's). Each worker process builds a model once and reuses it for every
shard it runs; under dask.distributed the cache is filled as the worker starts (``warmup``).

A key's ``torch_threads`` of 0 leaves the count to the process: on a cluster the client cannot
know the workers' machines, so each worker uses its own cores divided by its dask threads.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Hashable, Protocol

_MODELS: dict[Hashable, Any] = {}
_LOCK = threading.Lock()
_WORKER_THREADS = [1]      # tasks this process runs at once (a dask worker's --nthreads)


class ModelKey(Protocol, Hashable):
    """Everything needed to build the same model in any process."""

    torch_threads: int

    def build(self) -> Any: ...


def note_worker_threads(count: int) -> None:
    """This process is a dask worker running ``count`` tasks at once (called as it starts)."""
    _WORKER_THREADS[0] = max(1, int(count))


def torch_threads(requested: int) -> int:
    """``requested``, or for 0: ``OMP_NUM_THREADS`` when set (dask's nanny sets it to 1 in every
    worker process it starts; several worker processes on one CPU host should share its cores
    this way), else this machine's cores shared among the worker's task threads."""
    if requested > 0:
        return requested
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // _WORKER_THREADS[0])


def get_model(key: ModelKey) -> Any:
    """The model for ``key``, built once per process. Torch's thread count is set to the key's
    on every call, not only when the model is built: float sums (a convolution's) may be split
    differently with another count, so a shard computed after other work in the same process
    (another key, a library that set its own count) must still give the same bytes."""
    import torch

    with _LOCK:
        threads = torch_threads(key.torch_threads)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        model = _MODELS.get(key)
        if model is None:
            model = key.build()
            _MODELS[key] = model
        return model
