"""Training the heads in N processes on one global batch (torchrun, DDP; gloo on CPU, NCCL on GPU).

The batch of B pairs is split into N contiguous parts of b = B/N rows; process r holds rows
``r*b .. (r+1)*b`` (its images *and* their captions). Every loss scores each caption against
every image of the whole batch, so a step is:

1. each process maps its own images, words and sentences (one ``forward`` of the DDP model);
2. ``gather_text``: the mapped text side (words padded to the batch's longest caption, their
   mask, sentences) is all-gathered — small, B·T·D floats — in rank order, so row i of the
   gathered text is row i of the global batch;
3. ``batch_scores``: each process scores all B captions against its b images with the existing
   ``cross_scores`` (a ``[B, b]`` column block), and the blocks are all-gathered into the full
   ``[B, B]`` matrix on every process (``gather_columns``; the phrase term's ``[Q, b]`` blocks
   likewise);
4. every process computes the whole loss on the full matrix: the same value one process would.

Gradients, and why nothing is rescaled. Both gathers are differentiable, and the backward of a
gather *sums* the incoming gradients of every process for the rows it sent (an all-reduce, then
each process keeps its own rows). Every process computes the same loss L from the same full
matrix, so each sends the same ``dL/dR``; process r therefore receives N·dL/d(its columns) and,
after the text gather's backward, N·dL/d(its words, sentences). Its parameter gradient is
N × (the share of the single-process gradient that flows through its own rows); DDP then
averages over the N processes, which leaves exactly the sum of the shares — the single-process
gradient. The L2 penalty is computed from the replicated weights on every process, so each
contributes the same ``weight_decay · w`` and the average is that once. So the loss is used as it
is: no factor N, nothing divided. (A gather whose backward returned only the local gradient
would need the loss multiplied by N instead; the tests pin the behaviour down.)

Padding to the longest caption of the global batch changes no score: ``cross_scores`` scores only
the real words (``mask``). B must be a multiple of N: gathers need equal shapes, and unequal
shards would need masked padding images in every score block for no gain.

Around the step, for the trainer: ``Launch.from_env`` reads the launcher's environment,
``joined`` forms (or reuses) the process group, ``wrap``/``unwrap`` put the heads in DDP and take
them out for checkpoints, ``all_sum`` adds validation counts, ``StopRequests`` makes Ctrl-C and
SIGTERM stop between two steps (every process at the same one), ``is_collective_error`` tells a
lost peer from a bug, and ``launcher_argv`` is the torchrun command ``train --nproc N`` runs.

The gather is written out here (``_Gather``, forward ``all_gather``, backward ``all_reduce`` +
own slice) rather than taken from ``torch.distributed.nn.functional.all_gather``: that one is
deprecated from torch 2.6 on (a FutureWarning every call) in favour of a private module
(``torch.distributed._functional_collectives``) whose names changed between releases and which
torch 2.1, our minimum, lacks. ``all_gather`` and ``all_reduce`` are supported by every backend.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor

from multigrounding.errors import MultigroundingError
from multigrounding.heads.scores import cross_scores

log = logging.getLogger(__name__)

ENVIRONMENT = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(MultigroundingError, RuntimeError):
    """The launcher's environment, the batch split or the process group is unusable."""


# ------------------------------------------------------------------------- the launcher's view
@dataclass(frozen=True)
class Launch:
    """Where this process stands among the N of a run, as the launcher (torchrun) said."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, metrics and reports."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Launch":
        """Read RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (torchrun sets them).

        None of RANK and WORLD_SIZE set: one process. With WORLD_SIZE > 1 all five are needed.
        """
        env = os.environ if environ is None else environ
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return cls()
        values = {name: _env_int(env, name) for name in ("RANK", "WORLD_SIZE")}
        world, rank = values["WORLD_SIZE"], values["RANK"]
        if world < 1 or not 0 <= rank < world:
            raise DistributedError(f"RANK={rank} and WORLD_SIZE={world}: need WORLD_SIZE >= 1 and "
                                   f"0 <= RANK < WORLD_SIZE")
        if world == 1:
            return cls(local_rank=_env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0)
        missing = [name for name in ENVIRONMENT if not env.get(name)]
        if missing:
            raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the "
                                   f"processes with torchrun (which sets {', '.join(ENVIRONMENT)}) "
                                   f"or set them all")
        local = _env_int(env, "LOCAL_RANK")
        port = _env_int(env, "MASTER_PORT")
        if local < 0 or not 0 < port < 65536:
            raise DistributedError(f"LOCAL_RANK={local} must be >= 0 and MASTER_PORT={port} in "
                                   f"1..65535")
        return cls(rank, world, local, env["MASTER_ADDR"], port)


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise DistributedError(f"environment variable {name} is not set") from None
    except ValueError:
        raise DistributedError(f"environment variable {name}={env[name]!r} is not an "
                               f"integer") from None


def start(launch: Launch, device: str | torch.device = "auto", *,
          timeout_s: float = DEFAULT_TIMEOUT_S, init_method: str | None = None) -> torch.device:
    """Join the process group (gloo on CPU, NCCL on CUDA with one device per LOCAL_RANK) and
    return this process's device. One process (WORLD_SIZE 1) joins nothing.

    ``timeout_s`` bounds every collective: a process whose peer died or hangs gives up after it
    (gloo notices a killed peer's closed connection at once; NCCL needs the timeout).
    ``init_method`` defaults to ``env://`` (MASTER_ADDR, MASTER_PORT); tests pass ``file://``.
    """
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if not launch.distributed:
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise DistributedError(f"LOCAL_RANK={launch.local_rank} but this node has {count} CUDA "
                                   f"device(s): start at most {count} processes per node")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"multi-process training runs on cpu or cuda, not {device.type}")
    if dist.is_initialized():
        raise DistributedError("a process group is already initialised in this process")
    dist.init_process_group(backend, init_method=init_method or "env://", rank=launch.rank,
                            world_size=launch.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d of %d joined the %s group on %s", launch.rank, launch.world_size, backend,
             device)
    return device


def stop() -> None:
    """Leave the process group (if any); safe to call twice."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def joined(launch: Launch, device: str | torch.device = "auto", *,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[torch.device]:
    """The process group a run trains in, and this process's device: a group the caller already
    joined is used and kept; otherwise the launcher's (``launch``) is joined here and left at
    the end; one process joins nothing."""
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                              "cpu" if device == "auto" else device)
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())
        yield device
        return
    with process_group(launch, device, timeout_s=timeout_s) as device:
        yield device


@contextlib.contextmanager
def process_group(launch: Launch, device: str | torch.device = "auto", **kwargs
                  ) -> Iterator[torch.device]:
    """``start`` … ``stop`` around a block; yields the device."""
    device = start(launch, device, **kwargs)
    try:
        yield device
    finally:
        stop()


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the joined group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the processes (float64, on ``device``: NCCL reduces only CUDA
    tensors); the values themselves without a process group."""
    if world()[1] == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def is_collective_error(error: BaseException) -> bool:
    """A collective that failed because another process stopped, was killed or timed out:
    torch.distributed.DistError, or the plain RuntimeError gloo still raises for a lost
    connection or a timeout ("[.../gloo/transport/tcp/pair.cc:545] Read error ...")."""
    kind = getattr(dist, "DistError", ())
    if isinstance(error, kind):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and world()[1] > 1 and ("gloo" in text or "nccl" in text)


def launcher_argv(arguments: list[str], nproc: int) -> list[str]:
    """The command that runs ``multigrounding ARGUMENTS`` (without ``--nproc``) in ``nproc``
    processes on this machine: torchrun (``python -m torch.distributed.run``) with a local
    rendezvous on a free port."""
    kept, skip = [], False
    for argument in arguments:
        if skip:
            skip = False
        elif argument == "--nproc":
            skip = True
        elif not argument.startswith("--nproc="):
            kept.append(argument)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "multigrounding", *kept]


class StopRequests:
    """Ctrl-C and SIGTERM stop training between two steps, so that the checkpoint rank 0 saves
    holds the weights, optimiser state and position of the same finished step.

    Raised wherever the signal lands, a KeyboardInterrupt can cut ``optimiser.step()`` in half
    or come after it but before the step is counted (a saved state that the resumed run then
    steps again); in a process group it can also land inside a collective, leaving the others
    blocked or failing mid-step. So while the run trains, SIGINT and SIGTERM only set a flag,
    and after every step ``requested()`` reads it — in a process group the maximum over the
    processes (one 1-element all-reduce), so all of them stop at the same step. One process
    stops at once on a second Ctrl-C; processes under torchrun do not (it forwards the
    terminal's Ctrl-C again, and kills them itself 30 s after its own signal).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, device: torch.device):
        self.device = device
        self.flag = False
        self._previous: dict = {}

    def install(self) -> "StopRequests":
        """Catch the signals (on the main thread only); ``restore`` undoes it."""
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._note)
        return self

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _note(self, number, frame) -> None:
        rank, size = world()
        if self.flag and size == 1 and number == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.flag:
            log.warning("%s: stopping after this step%s", signal.Signals(number).name,
                        f" (rank {rank}; every process at the same one)" if size > 1 else
                        " (Ctrl-C again to stop at once)")
        self.flag = True

    def requested(self) -> bool:
        """Whether this process, or any of its group, was asked to stop (in a group a
        collective: call it on every process)."""
        if world()[1] == 1:
            return self.flag
        return any(all_sum([float(self.flag)], self.device))


def wrap(heads: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The heads in DistributedDataParallel when there are several processes, else as they are.

    ``static_graph``: DDP records in the first step which parameters receive a gradient rather
    than assuming every one does (a switched-off loss term's mapping may get none)."""
    if world()[1] == 1:
        return heads
    return torch.nn.parallel.DistributedDataParallel(
        heads, device_ids=[device.index] if device.type == "cuda" else None, static_graph=True)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The heads inside ``wrap``'s result (what checkpoints store: the same keys for any N)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------- the split
def batch_part(batch_size: int, rank: int, world_size: int) -> slice:
    """The rows of a global batch that process ``rank`` of ``world_size`` holds (contiguous)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(f"rank {rank} of world size {world_size}")
    if batch_size % world_size:
        lower = batch_size - batch_size % world_size
        options = " or ".join(str(b) for b in (lower, lower + world_size) if b >= world_size)
        raise DistributedError(f"--batch-size {batch_size} does not split among {world_size} "
                               f"processes: the global batch must be a multiple of the number of "
                               f"processes (e.g. {options})")
    part = batch_size // world_size
    return slice(rank * part, (rank + 1) * part)


# ----------------------------------------------------------------------------- the gathers
class _Gather(torch.autograd.Function):
    """All-gather along axis 0 in rank order; backward: sum every process's gradient of these
    rows (all-reduce) and keep this process's slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = dist.get_rank(), dist.get_world_size()
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x)
        ctx.rows, ctx.rank = x.shape[0], rank
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)   # never reduce autograd's buffer
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: Tensor, dim: int = 0) -> Tensor:
    """Concatenate every process's ``x`` along ``dim`` in rank order (differentiable; equal
    shapes on every process). Without a process group it returns ``x``."""
    if world()[1] == 1:
        return x
    return _Gather.apply(x.movedim(dim, 0)).movedim(0, dim)


def gather_columns(block: Tensor) -> Tensor:
    """Score blocks ``[X, b]`` (rows against this process's b images) → ``[X, B]``."""
    return gather_rows(block, dim=1)


def _all_max(value: int, device: torch.device) -> int:
    if world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather_text(words: Tensor, mask: Tensor, sentence: Tensor | None
                ) -> tuple[Tensor, Tensor, Tensor | None]:
    """This process's mapped captions → the whole batch's: ``words [B, T, D]`` padded with zeros
    to the longest caption of the batch, ``mask [B, T]`` (bool), ``sentence [B, D]``.

    Words and sentences keep their gradient path to the process that mapped them. Without a
    process group the inputs come back unchanged.
    """
    if world()[1] == 1:
        return words, mask, sentence
    length = _all_max(words.shape[1], words.device)
    pad = length - words.shape[1]
    if pad:
        words = torch.nn.functional.pad(words, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask.to(torch.bool), (0, pad))
    flags = torch.empty((dist.get_world_size(),) + tuple(mask.shape), dtype=torch.uint8,
                        device=mask.device)
    dist.all_gather(list(flags.unbind(0)), mask.to(torch.uint8).contiguous())
    all_mask = flags.flatten(0, 1).bool()
    if sentence is None:
        return gather_rows(words), all_mask, None
    # one collective for both: the sentence rides as an extra position after the words
    both = gather_rows(torch.cat([words, sentence[:, None].to(words.dtype)], dim=1))
    return both[:, :length], all_mask, both[:, length].to(sentence.dtype)


# ------------------------------------------------------------------------------ the scores
def batch_scores(words: Tensor | None, mask: Tensor | None, sentence: Tensor | None,
                 visual: Tensor, **kwargs) -> tuple[Tensor | None, Tensor | None]:
    """``cross_scores`` of the whole batch's captions (``gather_text``'s output) against this
    process's images ``visual [b, N, L, D]``, gathered into ``(R_w [B, B], R_s [B, B])`` on every
    process. Without a process group it is ``cross_scores``."""
    r_w, r_s = cross_scores(words, mask, sentence, visual, **kwargs)
    if world()[1] == 1:
        return r_w, r_s
    present = [r for r in (r_w, r_s) if r is not None]
    gathered = gather_columns(torch.cat(present, dim=0)).split(present[0].shape[0], dim=0)
    if r_w is None:
        return None, gathered[0]
    return gathered[0], (gathered[1] if r_s is not None else None)

