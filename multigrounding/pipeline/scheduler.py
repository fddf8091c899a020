"""Running one task per shard on any dask scheduler, results reported as each task ends.

The same list of ``dask.delayed`` calls runs on the local schedulers (``synchronous``,
``threads``, ``processes``; processes are spawned, never forked, since torch and zarr start
threads) or on dask.distributed: a local cluster sized to the machine by default, or an
existing scheduler at a ``tcp://host:port`` address. Tasks report their own errors in their
results, so one bad shard never cancels the rest.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import dask
from dask.callbacks import Callback

log = logging.getLogger(__name__)

LOCAL_SCHEDULERS = ("synchronous", "threads", "processes")
SCHEDULERS = LOCAL_SCHEDULERS + ("distributed",)


@dataclass(frozen=True)
class Plan:
    """How many worker processes or threads, and torch threads in each (their product ≤ cores)."""

    scheduler: str
    workers: int
    torch_threads: int


def is_cluster_address(scheduler: str) -> bool:
    """Whether ``scheduler`` is the address of a running dask.distributed scheduler."""
    return scheduler.startswith(("tcp://", "tls://", "ucx://"))


def check_scheduler(scheduler: str) -> None:
    """Raise ValueError unless ``scheduler`` is a known name or a dask.distributed address."""
    if scheduler not in SCHEDULERS and not is_cluster_address(scheduler):
        raise ValueError(f"unknown scheduler {scheduler!r}: choose {', '.join(SCHEDULERS)} or a "
                         "dask.distributed address such as tcp://host:8786")


def plan_workers(scheduler: str, workers: int | None, device: str) -> Plan:
    """Workers and torch threads for the scheduler on this machine. A running cluster (an
    address) has its own workers, on machines the client does not know: torch threads are then
    0, each worker's cores over its task threads (``models.torch_threads``)."""
    check_scheduler(scheduler)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if scheduler == "synchronous":
        return Plan(scheduler, 1, cores)
    if is_cluster_address(scheduler):
        return Plan(scheduler, workers or 0, 0)
    if workers is None:
        workers = 1 if device.startswith("cuda") else max(1, cores // 4)
    return Plan(scheduler, workers, max(1, cores // workers))


class _Reporter(Callback):
    """Calls ``on_result`` from the local scheduler as each shard task finishes."""

    def __init__(self, keys: set, on_result: Callable[[Any], None]):
        super().__init__()
        self.keys = keys
        self.on_result = on_result

    def _posttask(self, key, result, dsk, state, worker_id):
        if key in self.keys:
            self.on_result(result)


def run_tasks(tasks: Sequence[dask.delayed], plan: Plan, on_result: Callable[[Any], None],
              on_error: Callable[[int, BaseException], None],
              warm: tuple[Callable[[Any], Any], Any] | None = None) -> None:
    """Compute every task; ``on_result(result)`` as each ends, ``on_error(i, exc)`` if a task
    itself died (a killed worker, say). ``warm = (loader, key)`` loads the model in each
    dask.distributed worker as it starts (local schedulers load it on first use)."""
    if not tasks:
        return
    if plan.scheduler in LOCAL_SCHEDULERS:
        keys = {task.key for task in tasks}
        with _Reporter(keys, on_result), dask.config.set({"multiprocessing.context": "spawn"}):
            dask.compute(*tasks, scheduler=plan.scheduler, num_workers=plan.workers)
        return
    _run_distributed(tasks, plan, on_result, on_error, warm)


def _quiet_distributed() -> None:
    """distributed sets its loggers to INFO on import; follow the root level instead."""
    root = logging.getLogger().getEffectiveLevel()
    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(root)


def _run_distributed(tasks, plan: Plan, on_result, on_error, warm) -> None:
    from distributed import Client, LocalCluster, as_completed

    _quiet_distributed()
    if plan.scheduler == "distributed":
        cluster = LocalCluster(n_workers=plan.workers, threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        cluster, client = None, Client(plan.scheduler)
    try:
        if warm is not None:
            from multigrounding.pipeline.warmup import WarmModel

            client.register_plugin(WarmModel(*warm))
        futures = client.compute(list(tasks))
        index = {future.key: i for i, future in enumerate(futures)}
        for future in as_completed(futures):
            try:
                on_result(future.result())
            except Exception as exc:  # the worker died or the task could not run
                on_error(index[future.key], exc)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
