"""One per-process cache of frozen models, for every kind of extraction task.

A task names its model by a key: a frozen, picklable dataclass with a ``build()`` method (a
backbone's, a text encoder's). Each worker process builds a model once and reuses it for every
shard it runs; under dask.distributed the cache is filled as the worker starts (``warmup``).
"""
from __future__ import annotations

import threading
from typing import Any, Hashable, Protocol

_MODELS: dict[Hashable, Any] = {}
_LOCK = threading.Lock()


class ModelKey(Protocol, Hashable):
    """Everything needed to build the same model in any process."""

    torch_threads: int

    def build(self) -> Any: ...


def get_model(key: ModelKey) -> Any:
    """The model for ``key``, built once per process (torch's thread count set first)."""
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            import torch

            torch.set_num_threads(key.torch_threads)
            model = key.build()
            _MODELS[key] = model
        return model
