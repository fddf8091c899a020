"""A run folder: its config, checkpoints, metrics log and loss curve, and the lock held while a
run writes to it.

The config is saved with absolute paths, so the folder resumes from any working directory; when
a path no longer exists (the run and its caches were moved together), the same path relative to
the run's old location is tried inside its new one. ``--resume DIR`` always works on DIR, never
on the folder the config names (a copied run writes into the copy). Only one run writes to a
folder at a time: a second is refused while the first holds the lock (an OS file lock, so a
killed run leaves nothing to clean up).

A store named by URL (``s3://bucket/prefix``) is kept exactly as given: it is not a path to
resolve or move. Storage options (credentials, endpoints) are never saved in config.json: a run
on object-store caches finds them, on ``--resume`` as on the first run, in the environment
(``AWS_*`` variables, ~/.aws, an instance role) or in ``--storage-options`` given again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Iterator

import filelock

from multigrounding.atomic import atomic_open
from multigrounding.cache.location import is_url
from multigrounding.errors import MultigroundingError
from multigrounding.heads.checkpoint import BEST, LAST
from multigrounding.heads.config import PATH_FIELDS, ConfigError, TrainConfig
from multigrounding.settings import read_json_object

CONFIG_FILE = "config.json"
SAVED_BEFORE_LEVEL_SELECTION = "paper"   # what a config.json without level_selection trained with
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"


class RunFolderError(MultigroundingError, ValueError):
    """A run folder that cannot be used as asked: locked, holding another run, not a run."""


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.last, self.best = self.path / LAST, self.path / BEST
        self.metrics = self.path / METRICS_FILE

    # ------------------------------------------------------------------ the lock
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the folder's lock while a run writes; a second writer is refused at once. A folder
        this made and left holding only its lock (the run failed before writing) is removed."""
        created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise RunFolderError(f"{self.path}: exists and is not a folder; choose another --out") from None
        except OSError as exc:
            raise RunFolderError(f"{self.path}: cannot create the run folder ({exc.strerror or exc})") from None
        lock = filelock.FileLock(str(self.path / LOCK_FILE), timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise RunFolderError(f"{self.path}: another training run is writing to this folder (it "
                                 f"holds {self.path / LOCK_FILE}); wait for it, or choose another "
                                 f"--out") from None
        except OSError as exc:
            raise RunFolderError(f"{self.path}: cannot write here ({exc.strerror or exc})") from None
        try:
            yield
        finally:
            lock.release()
            if created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
                (self.path / LOCK_FILE).unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    self.path.rmdir()

    # ------------------------------------------------------------------ the config
    def start(self, config: TrainConfig) -> None:
        """A new run: refuse a folder that holds another one, write config.json."""
        if (self.path / CONFIG_FILE).is_file():
            raise RunFolderError(f"{self.path} already holds a run; `multigrounding train --resume "
                                 f"{self.path}` continues it, or choose another --out")
        self.metrics.unlink(missing_ok=True)
        with atomic_open(self.path / CONFIG_FILE, "w", encoding="utf-8") as handle:
            json.dump(config.to_dict(), handle, indent=2)

    def config(self) -> TrainConfig:
        """The run's config, its ``out`` this folder and its stores found from here."""
        path = self.path / CONFIG_FILE
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: not a run directory (no such folder)")
        if not path.is_file():
            raise RunFolderError(f"{self.path}: not a run directory (no {CONFIG_FILE})")
        try:
            data = read_json_object(path)
            # a run saved before the setting existed was trained with the paper's selection,
            # and continues with it (the default for new runs is another)
            data.setdefault("level_selection", SAVED_BEFORE_LEVEL_SELECTION)
            config = TrainConfig.from_dict(data, str(path))
        except ConfigError as exc:
            raise RunFolderError(f"{exc} (the run's config is damaged)") from None
        saved_at = Path(config.out) if config.out else self.path
        changes = {"out": str(self.path)}
        for name in PATH_FIELDS:
            value = getattr(config, name)
            if value is not None and not is_url(value):
                changes[name] = str(self._find(name, Path(value), saved_at))
        return dataclasses.replace(config, **changes)

    def _find(self, name: str, recorded: Path, saved_at: Path) -> Path:
        if recorded.exists():
            return recorded
        tried = [recorded]
        if recorded.is_absolute() and saved_at.is_absolute():
            moved = Path(os.path.normpath(self.path / os.path.relpath(recorded, saved_at)))
            if moved.exists():
                return moved.resolve()
            tried.append(moved)
        raise RunFolderError(f"{self.path}: the run's {name} store is not at "
                             f"{' or '.join(str(p) for p in tried)}; put it back, or edit "
                             f"{self.path / CONFIG_FILE}")

    def continues(self, config: TrainConfig) -> bool:
        """True when this folder holds a run of exactly ``config`` (resume it), False when it holds
        none; a run of another config here is an error (never trained over)."""
        if not (self.path / CONFIG_FILE).is_file():
            return False
        if self.config().to_dict() != absolute(config, self.path).to_dict():
            raise RunFolderError(f"{self.path} holds a run of another config; delete it or choose "
                                 "another folder")
        return True

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, metrics: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(metrics) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics.is_file():
            return []
        rows = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue        # a line cut off by a kill: the steps after the checkpoint go anyway
        return rows

    def drop_metrics_after(self, step: int) -> None:
        """Forget steps a killed run logged after its last checkpoint (they will be redone)."""
        kept = [row for row in self.read_metrics() if row.get("step", 0) <= step]
        with atomic_open(self.metrics, "w", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row) + "\n" for row in kept))

    def plot(self) -> None:
        """loss.png: the training loss per step and, when present, validation accuracy per epoch."""
        rows = self.read_metrics()
        steps = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if not steps:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4))
        axis.plot(*zip(*steps), label="training loss", color="tab:blue")
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        validation = [(r["step"], r["val_accuracy"]) for r in rows if "val_accuracy" in r]
        if validation:
            other = axis.twinx()
            other.plot(*zip(*validation), "o-", color="tab:orange", label="val pointing accuracy")
            other.set_ylabel("pointing accuracy")
        figure.tight_layout()
        with atomic_open(self.path / "loss.png", "wb") as handle:
            figure.savefig(handle, format="png")
        plt.close(figure)


def absolute(config: TrainConfig, out: str | os.PathLike | None = None) -> TrainConfig:
    """``config`` with every store path and ``out`` absolute (as a run folder saves it); a URL
    stays as it is."""
    changes = {name: str(Path(getattr(config, name)).resolve()) for name in PATH_FIELDS
               if getattr(config, name) is not None and not is_url(getattr(config, name))}
    changes["out"] = str(Path(out if out is not None else config.out).resolve())
    return dataclasses.replace(config, **changes)
