"""A dask.distributed worker plugin that loads a model as each worker starts.

Kept in its own module so that importing the pipeline does not import distributed; the
scheduler imports it only when it runs on a cluster.
"""
from __future__ import annotations

from typing import Any, Callable

from distributed import WorkerPlugin

from multigrounding.pipeline.models import note_worker_threads


class WarmModel(WorkerPlugin):
    """Calls ``loader(key)`` in each worker (the per-process model caches fill up front)."""

    name = "multigrounding-warm-model"

    def __init__(self, loader: Callable[[Any], Any], key: Any):
        self.loader = loader
        self.key = key

    def setup(self, worker) -> None:
        note_worker_threads(worker.state.nthreads)   # torch threads = cores / task threads
        self.loader(self.key)
