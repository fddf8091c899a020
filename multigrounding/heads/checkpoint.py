"""Checkpoints: everything to resume a run or to use its heads, in a file that cannot run code.

A checkpoint holds only tensors and plain containers (dicts, lists, strings, numbers): the
model's and the optimiser's state, the heads' and the run's configs, the stores' fingerprints and
configs, where the run was, and the random states (as lists and tensors, never numpy objects).
So it is loaded with ``torch.load(weights_only=True)``, whose unpickler refuses anything else: a
crafted ``.pt`` file cannot execute code here. It is written atomically (a crash leaves the old
file or the new one).

Checkpoints of multigrounding 0.x before format 2 pickled numpy's random state and can only be
read by running their pickle code; ``convert_legacy`` rewrites one in the safe format, and is
run only by a user who says they trust the file (``multigrounding convert-checkpoint --trust``).
"""
from __future__ import annotations

import dataclasses
import io
import pickle
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multigrounding import __version__
from multigrounding.atomic import atomic_open
from multigrounding.errors import MultigroundingError
from multigrounding.heads.model import GroundingHeads, HeadsConfig

FORMAT = "multigrounding-checkpoint"
FORMAT_VERSION = 2
LAST, BEST = "last.pt", "best.pt"


class CheckpointError(MultigroundingError, ValueError):
    """A checkpoint that is missing, damaged, unsafe to load, or of other stores."""


@dataclass
class Checkpoint:
    """One saved state of a run."""

    model: dict                      # the heads' state dict
    optimiser: dict                  # Adam's state dict
    heads_config: dict
    config: dict                     # the run's TrainConfig
    fingerprints: dict               # {"images": ..., "text": ...}: the stores it was trained on
    image_config: dict               # the stores' configs (which models made the features)
    text_config: dict
    epoch: int                       # epochs finished
    step_in_epoch: int               # steps done in the next epoch (a mid-epoch Ctrl-C)
    step: int                        # steps in all
    best: float | None               # best validation pointing accuracy so far
    rng: dict                        # torch, numpy and python random states, plain
    version: str = __version__
    path: str | None = None          # where it was read from (not saved)

    # ------------------------------------------------------------------ writing
    def save(self, path: str | Path) -> None:
        """Write atomically, in the safe format."""
        state = {name: getattr(self, name) for name in _SAVED}
        state["format"], state["format_version"] = FORMAT, FORMAT_VERSION
        buffer = io.BytesIO()     # serialised first: torch's zip writer hides a full disk's errno
        torch.save(state, buffer)
        with atomic_open(path, "wb") as handle:
            handle.write(buffer.getbuffer())

    # ------------------------------------------------------------------ reading
    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        """Read a checkpoint safely; a clear error for a missing, damaged, foreign or legacy file."""
        path = Path(path)
        state = _load_safely(path)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a multigrounding checkpoint")
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: checkpoint format {state.get('format_version')}, this "
                                  f"version of multigrounding reads format {FORMAT_VERSION}")
        missing = [name for name in _SAVED if name not in state]
        if missing:
            raise CheckpointError(f"{path}: damaged checkpoint (no {', '.join(missing)})")
        return cls(**{name: state[name] for name in _SAVED}, path=str(path))

    def heads(self, device: str = "cpu") -> GroundingHeads:
        """The trained heads, in eval mode."""
        try:
            heads = GroundingHeads(HeadsConfig(**self.heads_config))
            heads.load_state_dict(self.model)
        except (TypeError, KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"{self.path}: its heads do not load ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0]})") from None
        return heads.to(device).eval()

    def check_stores(self, fingerprints: dict) -> None:
        if self.fingerprints != fingerprints:
            raise CheckpointError(f"{self.path} was trained on other feature stores (fingerprints "
                                  f"{self.fingerprints} vs {fingerprints})")


_SAVED = tuple(f.name for f in dataclasses.fields(Checkpoint) if f.name != "path")


def capture_rng() -> dict:
    """The torch, numpy and python random states as tensors, lists and numbers."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, words, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "position": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "words": list(words), "gauss": gauss}}


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["position"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(p["words"]), p["gauss"]))


def _load_safely(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here" if not path.exists() else
                              f"{path}: is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (a checkpoint cut off before it was written?); "
                              f"use the run's other checkpoint, or train again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if _is_legacy(path):
            raise CheckpointError(
                f"{path}: a checkpoint of an older multigrounding, which stores numpy objects "
                f"and can only be read by running its pickle code. If you made this file "
                f"yourself, convert it once: `multigrounding convert-checkpoint {path} --trust`"
            ) from None
        reason = str(err).splitlines()[0] if str(err) else "unsupported content"
        raise CheckpointError(f"{path}: refused: it holds more than tensors and plain data, so "
                              f"loading it could run code ({reason[:160]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise CheckpointError(f"{path}: damaged or not a checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:160] if str(err) else 'unreadable'})"
                              ) from None


def _is_legacy(path: Path) -> bool:
    """A format-1 checkpoint: refused only for numpy's random state (names, not code, checked)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            data = archive.read(names[0]) if names else b""
    except (zipfile.BadZipFile, OSError, KeyError):
        return False
    return b"numpy" in data and b"heads_config" in data and b"format_version" not in data


def convert_legacy(path: str | Path, out: str | Path | None = None) -> Path:
    """Rewrite a format-1 checkpoint in the safe format. Runs the file's pickle code: only for
    files the user trusts (the command asks for ``--trust``)."""
    path = Path(path)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "heads_config" not in state or "rng" not in state:
        raise CheckpointError(f"{path}: not a multigrounding checkpoint")
    kind, keys, position, has_gauss, cached = state["rng"]["numpy"]
    version, words, gauss = state["rng"]["python"]
    rng = {"torch": state["rng"]["torch"],
           "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                     "position": int(position), "has_gauss": int(has_gauss),
                     "cached_gaussian": float(cached)},
           "python": {"version": version, "words": list(words), "gauss": gauss}}
    checkpoint = Checkpoint(
        model=state["model"], optimiser=state["optimiser"], heads_config=state["heads_config"],
        config=state["config"], fingerprints=state["fingerprints"],
        image_config=state.get("image_config") or {}, text_config=state.get("text_config") or {},
        epoch=int(state["epoch"]), step_in_epoch=int(state["step_in_epoch"]),
        step=int(state["step"]), best=state["best"], rng=rng,
        version=str(state.get("version", "unknown")))
    target = Path(out) if out is not None else path
    checkpoint.save(target)
    return target


def checkpoint_path(run: str | Path, checkpoint: str = "best") -> Path:
    """``best`` (falling back to ``last`` when the run had no validation), ``last``, or a path."""
    run = Path(run)
    if checkpoint not in (BEST[:-3], LAST[:-3]):
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"{path}: checkpoint not found")
        return path
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run directory")
    path = run / f"{checkpoint}.pt"
    if checkpoint == "best" and not path.is_file():
        path = run / LAST
    if not path.is_file():
        raise CheckpointError(f"{run}: no checkpoint yet ({path.name}); train it first, or "
                              f"`multigrounding train --resume {run}` to finish it")
    return path


def load_heads(run: str | Path, checkpoint: str = "best", device: str = "cpu"
               ) -> tuple[GroundingHeads, Checkpoint]:
    """The trained heads of a run in eval mode, and their checkpoint."""
    saved = Checkpoint.load(checkpoint_path(run, checkpoint))
    return saved.heads(device), saved
