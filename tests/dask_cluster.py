"""A real dask.distributed cluster on 127.0.0.1 for tests and benchmarks: ``dask scheduler`` and
``dask worker`` processes started from dask's own command line (``python -m dask``), each worker
one process with one thread and no nanny, so that SIGKILL to its pid kills the worker itself.
Logs go to files in the given folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


class Cluster:
    """``dask scheduler`` and ``dask worker`` processes on 127.0.0.1, logs in ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.scheduler_file = folder / "scheduler.json"
        self.processes: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        process = subprocess.Popen([sys.executable, "-m", "dask", *args], stdout=log,
                                   stderr=subprocess.STDOUT,
                                   env=None if env is None else {**os.environ, **env})
        log.close()
        self.processes[name] = process
        return process

    def start(self) -> "Cluster":
        self._start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0",
                    "--no-dashboard", "--scheduler-file", str(self.scheduler_file))
        deadline = time.monotonic() + 120
        while not self.scheduler_file.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert self.scheduler_file.is_file(), (self.folder / "scheduler.log").read_text()
        self.address = json.loads(self.scheduler_file.read_text())["address"]
        return self

    def add_worker(self, name: str, env: dict | None = None) -> subprocess.Popen:
        """One more worker (``env``: extra environment variables, OMP_NUM_THREADS say)."""
        return self._start(name, "worker", "--scheduler-file", str(self.scheduler_file),
                           "--nworkers", "1", "--nthreads", "1", "--no-nanny", "--no-dashboard",
                           "--host", "127.0.0.1", "--name", name, env=env)

    def workers(self) -> dict[str, str]:
        """Worker name → address, as the scheduler knows them now."""
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            return {info["name"]: address
                    for address, info in client.scheduler_info()["workers"].items()}

    def wait_for_workers(self, count: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            client.wait_for_workers(count, timeout=180)

    def processing(self, address: str) -> list:
        from distributed import Client

        with Client(self.address, timeout=60) as client:
            return list(client.processing(workers=[address]).get(address, ()))

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
