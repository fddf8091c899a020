"""Multi-process head training (issue 15): the cost of splitting one global batch over processes.

1. Step time and peak memory per process, world size 1 vs 2 at the same global batch B, each
   world in fresh processes (gloo on CPU), alternated over rounds: the trainer's step
   (``trainer._step``, DDP as ``distributed.wrap`` makes it) on cache-shaped synthetic batches.
   One torch thread per process is the like-for-like comparison; world 1 on every core is the
   other view. On a 2-core machine the ratio is the overhead of the gathers and of DDP, not a
   speed-up.
2. The bytes each process sends through collectives per step, as a function of B and D: the
   formula below, and measured by counting every tensor handed to a collective (the gathers'
   forward and backward, and DDP's gradient buckets through a counting communication hook).
3. The whole trainer (``train()``: the cache read ahead, DDP, metrics, checkpoints, the stop
   agreement each step) on a real extracted cache, 1 process vs 2 started as torchrun would
   (the environment only), the same global B and seed: seconds per step (compute + waiting for
   data, rank 0's metrics), wall time, peak RSS per process, and how far the two runs' losses
   and weights end apart.

Payload bytes per process per step (e = 4 bytes, N processes, b = B/N, T = the batch's longest
caption, Q = phrase labels, P = trainable parameters):

    forward    longest caption   all-reduce   8
               caption masks     all-gather   (N-1) b T            (uint8, received)
               words+sentences   all-gather   (N-1) b (T+1) D e    (received)
               score columns     all-gather   (N-1) 2B b e         (R_w and R_s; + (N-1) Q b e)
    backward   score gradients   all-reduce   2 B² e               (+ Q B e)
               text gradients    all-reduce   B (T+1) D e
    DDP        parameter grads   all-reduce   P e

A ring all-reduce of S bytes moves about 2 (N-1)/N S in and out of each process.

The trainer adds one 8-byte all-reduce per step (whether any process was asked to stop).

Run:  python benchmarks/bench_distributed.py [--batch 32] [--dim 256] [--rounds 3] [--steps 5]
      [--trainer-images 256] [--workdir DIR]   (--trainer-images 0 skips part 3)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stat, cores, machine_line, table  # noqa: E402

from multigrounding.heads import distributed  # noqa: E402
from multigrounding.heads.checkpoint import Checkpoint  # noqa: E402
from multigrounding.heads.config import TrainConfig  # noqa: E402
from multigrounding.heads.data import Batch  # noqa: E402
from multigrounding.heads.model import GroundingHeads, HeadsConfig  # noqa: E402
from multigrounding.heads.trainer import _step, train  # noqa: E402


def synthetic_batch(seed: int, args, batch: int) -> Batch:
    """Cache-shaped float16 features: levels [B, M, M, C_k], words padded to the longest."""
    rng = np.random.default_rng(seed)
    visual = [rng.standard_normal((batch, args.grid, args.grid, c)).astype(np.float16)
              for c in args.channels]
    lengths = rng.integers(max(1, args.words // 2), args.words + 1, batch)
    lengths[0] = args.words
    mask = np.arange(args.words)[None, :] < lengths[:, None]
    tokens = rng.standard_normal((batch, args.words, args.text_layers, args.text_dim))
    tokens = (tokens * mask[:, :, None, None]).astype(np.float16)
    sentence = rng.standard_normal((batch, args.sentence_vectors, args.text_dim)).astype(np.float16)
    return Batch(np.arange(batch), np.arange(batch), visual, tokens, mask, sentence)


def share(batch: Batch, part: slice) -> Batch:
    mask = batch.mask[part]
    width = int(mask.sum(1).max())
    return Batch(batch.image_rows[part], batch.caption_rows[part], [v[part] for v in batch.visual],
                 batch.tokens[part, :width], mask[:, :width], batch.sentence[part])


def heads_for(args, dim: int) -> GroundingHeads:
    torch.manual_seed(0)
    return GroundingHeads(HeadsConfig(visual_channels=list(args.channels), text_layers=args.text_layers,
                                      text_dim=args.text_dim, sentence_vectors=args.sentence_vectors,
                                      dim=dim))


class Counter:
    """Bytes handed to collectives: all-gathers count what this process receives."""

    def __init__(self):
        self.counts: dict[str, int] = {}
        self.key = "all_reduce"              # "ddp" while DDP's hook all-reduces a bucket
        self._gather, self._reduce = dist.all_gather, dist.all_reduce

    def add(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def install(self) -> None:
        def all_gather(outputs, tensor, *a, **k):
            self.add("all_gather", (len(outputs) - 1) * tensor.numel() * tensor.element_size())
            return self._gather(outputs, tensor, *a, **k)

        def all_reduce(tensor, *a, **k):
            self.add(self.key, tensor.numel() * tensor.element_size())
            return self._reduce(tensor, *a, **k)
        dist.all_gather, dist.all_reduce = all_gather, all_reduce

    def ddp_hook(self, state, bucket):
        self.key = "ddp"
        try:
            return default_hooks.allreduce_hook(state, bucket)
        finally:
            self.key = "all_reduce"


def _join(rank: int, world: int, rendezvous: str, threads: int) -> None:
    torch.set_num_threads(threads)
    distributed.start(distributed.Launch(rank, world, rank), "cpu",
                      init_method=f"file://{rendezvous}", timeout_s=600)


def _model(heads: GroundingHeads, world: int, counter: Counter | None = None):
    """The trainer's model: ``distributed.wrap`` (DDP with a static graph in a group)."""
    model = distributed.wrap(heads, torch.device("cpu"))
    if world > 1 and counter is not None:
        model.register_comm_hook(None, counter.ddp_hook)
    return model


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_worker(rank: int, world: int, rendezvous: str, out: str, args, threads: int) -> None:
    _join(rank, world, rendezvous, threads)
    try:
        config = TrainConfig(images="-", text="-", out="-", dim=args.dim)
        model = _model(heads_for(args, args.dim), world)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
        part = distributed.batch_part(args.batch, rank, world)
        batches = [share(synthetic_batch(s, args, args.batch), part) for s in range(args.steps + 1)]
        _step(model, optimiser, batches[0], config, "cpu")          # warm-up
        before = _rss_mb()
        times, cpu, losses = [], [], []
        for batch in batches[1:]:
            if world > 1:
                dist.barrier()
            started, started_cpu = time.perf_counter(), time.process_time()
            losses.append(_step(model, optimiser, batch, config, "cpu")["loss"])
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: kB
        Path(out, f"rank{rank}.json").write_text(json.dumps(
            {"times": times, "cpu": cpu, "losses": losses, "rss_before_mb": before, "peak_mb": peak}))
    finally:
        distributed.stop()


def bytes_worker(rank: int, world: int, rendezvous: str, out: str, args, threads: int) -> None:
    _join(rank, world, rendezvous, 1)
    try:
        counter = Counter()
        counter.install()
        rows = []
        for batch_size in args.byte_batches:
            for dim in args.byte_dims:
                heads = heads_for(args, dim)
                parameters = sum(p.numel() for p in heads.parameters())
                model = _model(heads, world, counter)
                config = TrainConfig(images="-", text="-", out="-", dim=dim)
                optimiser = torch.optim.SGD(model.parameters(), lr=0.0)
                batch = share(synthetic_batch(0, args, batch_size),
                              distributed.batch_part(batch_size, rank, world))
                counter.counts = {}
                _step(model, optimiser, batch, config, "cpu")
                rows.append({"B": batch_size, "D": dim, "P": parameters, **counter.counts})
        if rank == 0:
            Path(out, "bytes.json").write_text(json.dumps(rows))
    finally:
        distributed.stop()


def run(worker, world: int, args, threads: int = 1) -> list[dict] | list:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(world, str(Path(folder) / "rendezvous"), folder, args, threads),
                 nprocs=world, join=True)
        if worker is bytes_worker:
            return json.loads(Path(folder, "bytes.json").read_text())
        return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]


# ----------------------------------------------------------------------- 3. the whole trainer
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_worker(rank: int, world: int, port: int, out: str, settings: dict, threads: int) -> None:
    """One process of a run as a launcher starts it: the environment, then ``train``."""
    if world > 1:
        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)
    summary = train(TrainConfig(**settings))
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"seconds": summary.seconds, "steps": summary.steps,
         "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_trainer(world: int, threads: int, settings: dict, folder: Path) -> dict:
    folder.mkdir(parents=True)
    settings = {**settings, "out": str(folder / "run")}
    mp.spawn(trainer_worker, args=(world, _free_port(), str(folder), settings, threads),
             nprocs=world, join=True)
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r][1:]                # the first step builds DDP's graph
    return {"step": float(np.median([r["step_seconds"] + r["data_wait_seconds"] for r in steps])),
            "wait": float(np.median([r["data_wait_seconds"] for r in steps])),
            "wall": max(r["seconds"] for r in ranks) / ranks[0]["steps"],
            "peak": [r["peak_mb"] for r in ranks],
            "losses": [r["loss"] for r in rows if "loss" in r],
            "weights": Checkpoint.load(folder / "run" / "last.pt").model}


def bench_trainer(args) -> None:
    from bench_train import build_caches

    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    _, images, text = build_caches(workdir / "caches", args.trainer_images, "efficientnet_lite0",
                                   "imagenet")
    settings = dict(images=str(images), text=str(text), out="-", dim=args.dim,
                    batch_size=args.batch, epochs=args.trainer_epochs, seed=0, device="cpu")
    setups = [(1, 1), (2, 1), (1, cores())] if cores() > 1 else [(1, 1), (2, 1)]
    found = {s: [] for s in setups}
    for round_ in range(args.rounds):
        for s in (setups if round_ % 2 == 0 else setups[::-1]):
            found[s].append(run_trainer(*s, settings, workdir / f"runs-{round_}-{s[0]}x{s[1]}"))
    rows = []
    for w, t in setups:
        results = found[(w, t)]
        rows.append([f"{w} x {t} thread{'s' if t > 1 else ''}", Stat([r["step"] for r in results]).fmt(".3f", " s"),
                     Stat([r["wait"] for r in results]).fmt(".3f", " s"),
                     Stat([r["wall"] for r in results]).fmt(".2f", " s"),
                     Stat([p for r in results for p in r["peak"]]).fmt(".0f", " MB")])
    steps = len(found[(1, 1)][0]["losses"])
    print(f"## 3. the whole trainer: {args.trainer_images} synthetic images (EfficientNet-Lite0, "
          f"MiniLM), B={args.batch}, D={args.dim}, {args.trainer_epochs} epochs = {steps} steps")
    print(table(["processes x threads", "s/step (compute + data wait, rank 0)", "of which data wait",
                 "wall s/step (whole run incl. start)", "peak RSS per process"], rows))
    ratio = Stat([b["step"] / a["step"] for a, b in zip(found[(1, 1)], found[(2, 1)])])
    one, two = found[(1, 1)][0], found[(2, 1)][0]
    loss_gap = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    gaps = {k: float((one["weights"][k] - two["weights"][k]).abs().max()) for k in one["weights"]}
    others = max(v for k, v in gaps.items() if k != "word_mix.gamma")
    print(f"s/step 2 processes / 1 (1 thread each): {ratio.fmt('.2f')}; float32 after {steps} "
          f"steps, 2 processes vs 1: loss <= {loss_gap:.1e}, weights <= {others:.1e} (the word "
          f"mix's gamma {gaps['word_mix.gamma']:.1e})\n")


def formula(batch: int, dim: int, words: int, parameters: int, world: int, e: int = 4) -> dict:
    n, b = world, batch // world
    return {"all_gather": (n - 1) * (b * words + b * (words + 1) * dim * e + 2 * batch * b * e),
            "all_reduce": 8 + 2 * batch * batch * e + batch * (words + 1) * dim * e,
            "ddp": parameters * e}


def bench_steps(args) -> None:
    # (processes, torch threads each): one thread each is the like-for-like comparison (the same
    # work per thread; CPU seconds show the overhead); world 1 on every core is the other view
    setups = [(1, 1), (2, 1), (1, cores())] if cores() > 1 else [(1, 1), (2, 1)]
    wall = {s: [] for s in setups}
    cpu = {s: [] for s in setups}
    memory = {s: [] for s in setups}
    loss_gap = []
    for round_ in range(args.rounds):
        order = setups if round_ % 2 == 0 else setups[::-1]
        results = {s: run(timed_worker, s[0], args, s[1]) for s in order}
        for s in setups:
            # a step ends when the slowest process ends it; CPU seconds add over processes
            wall[s].append(float(np.median(np.max([r["times"] for r in results[s]], axis=0))))
            cpu[s].append(float(np.median(np.sum([r["cpu"] for r in results[s]], axis=0))))
            memory[s].extend((r["peak_mb"], r["peak_mb"] - r["rss_before_mb"]) for r in results[s])
        loss_gap.append(max(abs(a - b) for r in results[(2, 1)]
                            for a, b in zip(r["losses"], results[(1, 1)][0]["losses"])))
    rows = [[f"{w} x {t} thread{'s' if t > 1 else ''}", Stat(wall[(w, t)]).fmt(".3f", " s"),
             Stat(cpu[(w, t)]).fmt(".3f", " s"), Stat([m[0] for m in memory[(w, t)]]).fmt(".0f", " MB"),
             Stat([m[1] for m in memory[(w, t)]]).fmt(".0f", " MB")] for w, t in setups]
    print("## 1. step time and peak memory per process (same global batch)")
    print(table(["processes x threads", "wall s/step", "CPU s/step (all processes)",
                 "peak RSS per process", "peak above pre-step RSS"], rows))
    overhead = Stat([c2 / c1 for c1, c2 in zip(cpu[(1, 1)], cpu[(2, 1)])])
    speed = Stat([w1 / w2 for w1, w2 in zip(wall[(1, 1)], wall[(2, 1)])])
    print(f"CPU seconds per step, 2 processes / 1 (1 thread each): {overhead.fmt('.2f')} — the "
          f"overhead; wall-clock speed-up of 2 processes over 1 on these {cores()} cores: "
          f"{speed.fmt('.2f')}; float32 loss |world 2 - world 1| <= {max(loss_gap):.1e}\n")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--grid", type=int, default=8, help="M: the cached maps are M x M")
    parser.add_argument("--channels", type=lambda s: [int(c) for c in s.split(",")],
                        default=[40, 112, 320, 1280], help="C_k of each cached level")
    parser.add_argument("--words", type=int, default=15, help="the longest caption (T)")
    parser.add_argument("--text-layers", type=int, default=7)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--sentence-vectors", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--byte-batches", type=lambda s: [int(c) for c in s.split(",")],
                        default=[8, 16, 32])
    parser.add_argument("--byte-dims", type=lambda s: [int(c) for c in s.split(",")],
                        default=[128, 512])
    parser.add_argument("--trainer-images", type=int, default=256,
                        help="part 3: images in the extracted cache (0: skip part 3)")
    parser.add_argument("--trainer-epochs", type=int, default=3)
    parser.add_argument("--workdir", help="keep the cache of part 3 here (reused when present)")
    parser.add_argument("--only", choices=("steps", "bytes", "trainer"), help="run one part")
    args = parser.parse_args()
    print(machine_line())
    print(f"B={args.batch}, D={args.dim}, M={args.grid}, levels {args.channels}, T={args.words}, "
          f"text {args.text_layers}x{args.text_dim}, {args.sentence_vectors} sentence vectors; "
          f"{args.steps} timed steps after one warm-up, {args.rounds} rounds\n")

    if args.only in (None, "steps"):
        bench_steps(args)
    if args.only in (None, "bytes"):
        print("## 2. bytes through collectives per process per step (world 2), measured vs formula")
        measured = run(bytes_worker, 2, args)
        rows = []
        for row in measured:
            expected = formula(row["B"], row["D"], args.words, row["P"], 2)
            rows.append([row["B"], row["D"], row["P"]] + [
                f"{row.get(k, 0):,} / {expected[k]:,}" for k in ("all_gather", "all_reduce", "ddp")])
        print(table(["B", "D", "parameters", "gathers received (measured / formula)",
                     "gather backward + max all-reduces", "DDP gradient all-reduce"], rows))
    if args.only in (None, "trainer") and args.trainer_images:
        bench_trainer(args)

if __name__ == "__main__":
    main()
