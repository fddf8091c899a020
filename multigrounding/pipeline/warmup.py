"""A dask.distributed worker plugin that loads a model as each worker starts.

Kept in its own module so that importing the pipeline does not import distributed; the
scheduler imports it only when it runs on a cluster.
"""
from __future__ import annotations

from typing import Any, Callable

from distributed import WorkerPlugin


class WarmModel(WorkerPlugin):
    """Calls ``loader(key)`` in each worker (the per-process model caches fill up front)."""

    name = "multigrounding-warm-model"

    def __init__(self, loader: Callable[[Any], Any], key: Any):
        self.loader = loader
        self.key = key

    def setup(self, worker) -> None:
        self.loader(self.key)
