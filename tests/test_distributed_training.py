"""The trainer in two real gloo processes against one: the same pairs, the same run.

tests/test_distributed.py checks the maths of one step (every loss, the phrase term) in
float64; these run the whole trainer (its data, DDP, checkpoints, validation, resume, a killed
process) on a small real cache: 32 synthetic images extracted with EfficientNet-Lite0 and
MiniLM, D = 16.

Float32 from the heads' real initialisation: the word mix's scale gamma has an exact gradient of
0 at the first step (zero biases, positively homogeneous text mapping, L2-normalised words), so
Adam's first step moves it by lr·g/(|g| + eps) with g pure roundoff, which differs between any
two summation orders. Every other weight of a two-process run stays within 1e-6 of the
one-process run; gamma within 1e-4 (lr is 1e-3). Three steps from a trained point (a resumed
run, where gamma's gradient is real) match to 1e-6 in every weight.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from click.testing import CliRunner

from multigrounding.cli import main
from multigrounding.datasets.synth import generate_synth
from multigrounding.evaluation.phrase_pointing import evaluate_pointing, pointing_validator
from multigrounding.heads.checkpoint import Checkpoint
from multigrounding.heads.config import TrainConfig
from multigrounding.heads.data import PairedCaches, Prefetcher, epoch_pairs
from multigrounding.heads.distributed import batch_part, launcher_argv
from multigrounding.heads.trainer import train
from multigrounding.pipeline.image_task import ImageExtraction, extract_images
from multigrounding.pipeline.text_task import TextExtraction, extract_text

WORLD = 2
GAMMA = "word_mix.gamma"


def make_caches(root: Path, images: int, seed: int) -> dict:
    generate_synth(root / "data", images, seed=seed, size=96)
    manifest = root / "data" / "manifest.jsonl"
    extract_images(ImageExtraction(manifest, root / "images", scheduler="synchronous", shard_size=16))
    extract_text(TextExtraction(manifest, root / "text", scheduler="synchronous", shard_size=64))
    return {"manifest": str(manifest), "images": str(root / "images"), "text": str(root / "text")}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-caches")
    return {"train": make_caches(root / "train", 32, seed=21), "val": make_caches(root / "val", 8, seed=22)}


@pytest.fixture(autouse=True)
def one_thread():
    """The one-process runs here use one thread, as each of the two processes does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config_for(caches, out, validation=False, **fields) -> dict:
    settings = dict(images=caches["train"]["images"], text=caches["train"]["text"], out=str(out),
                    dim=16, batch_size=10, epochs=1, seed=1, device="cpu", prefetch=1)
    if validation:
        settings.update(val_images=caches["val"]["images"], val_text=caches["val"]["text"],
                        val_manifest=caches["val"]["manifest"])
    return {**settings, **fields}


def validator(config: TrainConfig):
    if not config.val_manifest:
        return None
    return pointing_validator(config.val_images, config.val_text, config.val_manifest,
                              batch_size=config.batch_size, heatmap=config.heatmap)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(rank: int, port: int, world: int = WORLD) -> dict:
    """What torchrun (or any launcher) sets for one process."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _writes_under(folder: str, record: list):
    """An audit hook noting every write this process makes under ``folder``: files opened for
    writing (Python's open and os.open), renames, removals and new folders."""
    root = os.path.realpath(folder)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path) -> bool:
        return isinstance(path, (str, bytes, os.PathLike)) and \
            os.path.realpath(os.fsdecode(path)).startswith(root)

    def hook(event, args):
        if event == "open" and inside(args[0]):
            mode, flags = args[1], args[2] or 0
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & write_flags:
                record.append(f"open {args[0]}")
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate") and \
                any(inside(a) for a in args[:2]):
            record.append(f"{event} {' '.join(map(str, args[:2]))}")
    return hook


def _rank_worker(rank: int, port: int, settings: dict, resume: bool, report: str) -> None:
    """One process of a run started by a launcher: the environment only, the trainer joins."""
    os.environ.update(launcher_env(rank, port))
    torch.set_num_threads(1)
    writes: list[str] = []
    sys.addaudithook(_writes_under(settings["out"], writes))
    config = TrainConfig(**settings)
    summary = train(config, resume=resume, validate=validator(config))
    Path(f"{report}.{rank}.json").write_text(json.dumps(
        {"writes": writes, "steps": summary.steps, "epochs": summary.epochs,
         "loss": summary.final_loss, "best": summary.best_accuracy,
         "history": summary.history}))


def run_two(settings: dict, tmp_path: Path, resume: bool = False) -> list[dict]:
    report = str(tmp_path / f"report-{Path(settings['out']).name}")
    mp.spawn(_rank_worker, args=(_free_port(), settings, resume, report), nprocs=WORLD, join=True)
    return [json.loads(Path(f"{report}.{r}.json").read_text()) for r in range(WORLD)]


def run_one(settings: dict, resume: bool = False, progress=None):
    config = TrainConfig(**settings)
    return train(config, resume=resume, validate=validator(config), progress=progress)


def weights(out) -> dict:
    return Checkpoint.load(Path(out) / "last.pt").model


def differences(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys()
    return {name: float((a[name] - b[name]).abs().max()) for name in a}


def losses(out) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows if "loss" in row]


# ------------------------------------------------------------------------------ the pairs
def test_the_processes_parts_make_up_the_one_process_batch(caches):
    """Each process reads rows r·b..(r+1)·b of the same global batch (features and captions)
    and the whole batch's phrase labels; together the parts are the one-process batch."""
    paired = PairedCaches(caches["train"]["images"], caches["train"]["text"])
    pairs = epoch_pairs(paired, 10, seed=1, epoch=2)
    whole = list(Prefetcher(paired, pairs, depth=1))
    parts = [list(Prefetcher(paired, pairs, depth=1, part=batch_part(10, r, WORLD)))
             for r in range(WORLD)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 3
    for step, (batch, _) in enumerate(whole):
        shares = [parts[r][step][0] for r in range(WORLD)]
        assert np.array_equal(np.concatenate([s.image_rows for s in shares]), batch.image_rows)
        assert np.array_equal(np.concatenate([s.caption_rows for s in shares]), batch.caption_rows)
        for k, level in enumerate(batch.visual):
            assert np.array_equal(np.concatenate([s.visual[k] for s in shares]), level)
        assert np.array_equal(np.concatenate([s.sentence for s in shares]), batch.sentence)
        for r, share in enumerate(shares):
            rows = batch_part(10, r, WORLD)
            width = share.tokens.shape[1]          # padded to its own longest caption
            assert np.array_equal(share.mask, batch.mask[rows, :width])
            assert not batch.mask[rows, width:].any()
            assert np.array_equal(share.tokens, batch.tokens[rows, :width])


# ------------------------------------------------------------------- a run in two processes
def test_two_processes_train_the_run_one_process_trains(caches, tmp_path):
    """Three steps and a validation from the real initialisation: the same pairs (per-step
    losses), the same weights, the same validation; only rank 0 writes."""
    one = tmp_path / "one"
    run_one(config_for(caches, one, validation=True))
    two = tmp_path / "two"
    reports = run_two(config_for(caches, two, validation=True), tmp_path)

    assert [step for step, _ in losses(two)] == [step for step, _ in losses(one)] == [1, 2, 3]
    loss_gap = max(abs(a - b) for (_, a), (_, b) in zip(losses(one), losses(two)))
    gaps = differences(weights(one), weights(two))
    print(f"per-step loss |2 - 1| <= {loss_gap:.1e}; weights: gamma {gaps[GAMMA]:.1e}, others "
          f"<= {max(v for k, v in gaps.items() if k != GAMMA):.1e}")
    assert loss_gap <= 1e-5
    assert all(gap <= 1e-6 for name, gap in gaps.items() if name != GAMMA), gaps
    assert gaps[GAMMA] <= 1e-4

    # validation: the sharded pointing game gives every process the one-process accuracy
    one_rows = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    two_rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["val_accuracy"] for r in one_rows if "val_accuracy" in r]
    assert [r["val_accuracy"] for r in two_rows if "val_accuracy" in r] == accuracy
    assert [report["best"] for report in reports] == accuracy * WORLD

    # one writer: rank 0 wrote the whole run folder, rank 1 nothing at all
    assert reports[1]["writes"] == []
    written = " ".join(reports[0]["writes"])
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "loss.png", ".lock"):
        assert name in written, name
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert [r["steps"] for r in reports] == [3, 3]


def _interrupt_after(step: int):
    def progress(metrics):
        if metrics["step"] == step:
            raise KeyboardInterrupt
    return progress


def test_resuming_with_two_processes_or_one_takes_the_same_three_steps(caches, tmp_path):
    """A run stopped (Ctrl-C) after its first epoch resumes with 2 processes and, from the same
    checkpoint, with 1: the same next epoch's three steps, every weight within 1e-6."""
    first = tmp_path / "first"
    with pytest.raises(KeyboardInterrupt):
        run_one(config_for(caches, first, epochs=2), progress=_interrupt_after(3))
    stopped = Checkpoint.load(first / "last.pt")
    assert (stopped.epoch, stopped.step_in_epoch, stopped.step) == (0, 3, 3)
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(first, one)
    shutil.copytree(first, two)
    settings = TrainConfig.from_file(first / "config.json").to_dict()
    run_one({**settings, "out": str(one)}, resume=True)
    reports = run_two({**settings, "out": str(two)}, tmp_path, resume=True)

    assert [r["steps"] for r in reports] == [6, 6]
    assert [s for s, _ in losses(two)] == [s for s, _ in losses(one)] == [1, 2, 3, 4, 5, 6]
    assert losses(two)[:3] == losses(one)[:3]              # the first epoch's rows are kept
    loss_gap = max(abs(a - b) for (_, a), (_, b) in zip(losses(one), losses(two)))
    gaps = differences(weights(one), weights(two))
    moved = differences(weights(one), stopped.model)
    print(f"3 steps from a trained point: weights |2 - 1| <= {max(gaps.values()):.1e} (gamma "
          f"{gaps[GAMMA]:.1e}); they moved up to {max(moved.values()):.1e}; loss <= {loss_gap:.1e}")
    assert max(moved.values()) > 3e-4                      # lr is 2.5e-4 in epoch 2
    assert max(gaps.values()) <= 1e-6, gaps
    assert loss_gap <= 1e-5
    assert Checkpoint.load(two / "last.pt").step == Checkpoint.load(one / "last.pt").step == 6


# --------------------------------------------------------------------- one process is killed
def cli_run(arguments: list[str], env: dict | None = None, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "multigrounding", *arguments], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def train_arguments(caches, out, *extra) -> list[str]:
    # the paper's loss: the roundoff bound of the one-process resume below was measured with it
    # (under the aux recipe every level is trained and the drift grew to 9e-3 once)
    return ["train", "--images", caches["train"]["images"], "--text", caches["train"]["text"],
            "--out", str(out), "--dim", "16", "--batch-size", "8", "--seed", "3", "--device", "cpu",
            "--epochs", "20", "--level-selection", "paper", *extra]


def torchrun(arguments: list[str], **kwargs):
    return subprocess.Popen(launcher_argv(arguments, WORLD), env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.fixture(scope="module")
def reference(caches, tmp_path_factory) -> Path:
    """train_arguments' run in two processes (torchrun), never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    whole = torchrun(train_arguments(caches, out))
    output, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0, output[-3000:]
    return out


def wait_for_steps(out: Path, steps: int, processes: list) -> None:
    deadline = time.monotonic() + 240
    while len(losses(out) if (out / "metrics.jsonl").is_file() else []) < steps:
        assert all(p.poll() is None for p in processes), processes[0].communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the run never got going"
        time.sleep(0.02)


@pytest.mark.slow
def test_kill_9_of_rank_1_stops_rank_0_and_the_run_resumes_with_two_or_one(caches, reference,
                                                                          tmp_path):
    """Two processes started as a launcher would (the environment only); rank 1 killed after
    the first epoch: rank 0 stops at once, saying why, with last.pt saved at its last step.
    Resumed with torchrun (2 processes) it is the uninterrupted two-process run exactly;
    resumed from a copy in 1 process it takes the same batches to the same end."""
    killed = tmp_path / "killed"
    port = _free_port()
    ranks = [cli_run(train_arguments(caches, killed, "--dist-timeout", "30"), launcher_env(r, port))
             for r in range(WORLD)]
    try:
        wait_for_steps(killed, 6, ranks)
        os.kill(ranks[1].pid, signal.SIGKILL)
        at = time.monotonic()
        output, _ = ranks[0].communicate(timeout=60)
        took = time.monotonic() - at
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
            p.communicate()
    print(f"rank 0 exited {ranks[0].returncode} {took:.1f} s after rank 1 was killed")
    assert ranks[0].returncode not in (0, None) and took < 60
    assert "lost contact with the other training processes" in output, output[-2000:]
    saved = Checkpoint.load(killed / "last.pt")
    assert 6 <= saved.step < 80 and saved.step == max(s for s, _ in losses(killed))

    # resume with 2 processes (train --nproc 2: torchrun) and, from a copy, with 1
    with_one = tmp_path / "with-one"
    shutil.copytree(killed, with_one, ignore=shutil.ignore_patterns(".lock"))
    for resumed in (cli_run(["train", "--resume", str(killed), "--nproc", "2"]),
                    cli_run(["train", "--resume", str(with_one)])):
        output, _ = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, output[-3000:]

    want = dict(losses(reference))
    gaps = {}
    for out in (killed, with_one):
        got = dict(losses(out))
        assert sorted(got) == list(range(1, 81))      # every step once: none lost, none redone
        assert all(got[s] == want[s] for s in range(1, saved.step + 1))
        gaps[out.name] = (max(abs(got[s] - want[s]) for s in want),
                          max(differences(weights(out), weights(reference)).values()))
        assert Checkpoint.load(out / "last.pt").epoch == 20
    print(f"resumed at step {saved.step} of 80; vs the uninterrupted run (loss, weights): "
          + ", ".join(f"{name} {loss:.1e}, {weight:.1e}" for name, (loss, weight) in gaps.items()))
    assert gaps["killed"] == (0.0, 0.0)                 # resumed with 2: exactly the same run
    # resumed with 1: the same batches (a batch off would change a step's loss by ~0.1-1), the
    # float32 roundoff of another summation order growing over the ~70 steps left
    after = dict(losses(with_one))
    assert all(abs(after[s] - want[s]) <= 1e-5 for s in range(saved.step + 1, saved.step + 4))
    assert gaps["with-one"][0] <= 1e-3 and gaps["with-one"][1] <= 1e-3


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_process_at_one_step_and_rank_0_saves_it(caches, reference,
                                                                                tmp_path):
    """What a scheduler (or Ctrl-C) does: torchrun forwards the signal to every process, they
    stop together after one step, rank 0 saves that step; --resume is the uninterrupted run."""
    out = tmp_path / "stopped"
    run = torchrun(train_arguments(caches, out))
    try:
        wait_for_steps(out, 6, [run])
        run.send_signal(signal.SIGTERM)
        at = time.monotonic()
        output, _ = run.communicate(timeout=60)
        took = time.monotonic() - at
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    saved = Checkpoint.load(out / "last.pt")
    print(f"torchrun exited {run.returncode} {took:.1f} s after SIGTERM; last.pt at step {saved.step}")
    assert run.returncode != 0 and took < 30           # inside torchrun's 30 s grace period
    assert "Error: interrupted" in output, output[-3000:]         # rank 0's message
    assert 6 <= saved.step < 80 and saved.step == max(s for s, _ in losses(out))
    resumed = torchrun(["train", "--resume", str(out)])
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-3000:]
    assert losses(out) == losses(reference)
    assert max(differences(weights(out), weights(reference)).values()) == 0.0


# ------------------------------------------------------------------ sharded validation
def test_pointing_shards_add_up_to_the_whole_evaluation(caches, tmp_path):
    heads_run = tmp_path / "run"
    run_one(config_for(caches, heads_run))
    heads = Checkpoint.load(heads_run / "last.pt").heads()
    val = caches["val"]
    whole = evaluate_pointing(heads, val["images"], val["text"], val["manifest"], batch_size=3)
    shards = [evaluate_pointing(heads, val["images"], val["text"], val["manifest"], batch_size=3,
                                shard=(k, 3)) for k in range(3)]
    assert all(s.outcomes for s in shards)
    key = lambda o: (o.record, o.index)  # noqa: E731
    together = sorted((o for s in shards for o in s.outcomes), key=key)
    assert [(key(o), o.hit, o.xy, o.level) for o in together] == \
        [(key(o), o.hit, o.xy, o.level) for o in sorted(whole.outcomes, key=key)]
    assert sum((s.skipped for s in shards), start=type(whole.skipped)()) == whole.skipped
    assert sum((s.sentence_levels for s in shards), start=type(whole.sentence_levels)()) == \
        whole.sentence_levels


# ------------------------------------------------------------------------- the command line
def test_nproc_runs_torchrun_with_the_same_command_line():
    argv = launcher_argv(["-v", "train", "--nproc", "4", "--out", "r", "--nproc=4", "--epochs", "2"], 4)
    assert argv[:6] == [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node=4", "-m"]
    assert argv[6:] == ["multigrounding", "-v", "train", "--out", "r", "--epochs", "2"]


def test_nproc_is_refused_under_a_launcher_and_for_a_batch_that_does_not_split(caches, tmp_path):
    base = ["train", "--images", caches["train"]["images"], "--text", caches["train"]["text"],
            "--out", str(tmp_path / "r")]
    inside = CliRunner().invoke(main, [*base, "--nproc", "2"], env={"WORLD_SIZE": "2"})
    assert inside.exit_code == 2 and "already started by a launcher" in inside.output
    odd = CliRunner().invoke(main, [*base, "--nproc", "3", "--batch-size", "16"])
    assert odd.exit_code == 1 and "--batch-size 16 does not split among 3" in odd.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_train_nproc_2_then_evaluate_scores_as_one_process(caches, tmp_path):
    """The README's path: `train --nproc 2` and a one-process run of the same seed and batch,
    then `evaluate` on each: the same pointing and retrieval figures."""
    val = caches["val"]
    reports = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        out = tmp_path / name
        run = subprocess.run([sys.executable, "-m", "multigrounding",
                              *train_arguments(caches, out)[:-2], "--epochs", "4", *extra],
                             capture_output=True, text=True, timeout=600,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert run.returncode == 0, run.stderr[-3000:]
        report = tmp_path / f"report-{name}"
        result = CliRunner().invoke(main, ["evaluate", str(out), "--manifest", val["manifest"],
                                           "--images", val["images"], "--text", val["text"],
                                           "--out", str(report), "--pictures", "0"])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((report / "metrics.json").read_text())
    one, two = (flat({k: reports[n][k] for k in ("pointing", "retrieval")}) for n in ("one", "two"))
    assert one.keys() == two.keys()
    for key, value in one.items():
        if isinstance(value, float):      # attention correctness: means of float32 heatmaps
            assert abs(value - two[key]) <= 1e-6, key
        else:                             # hits, misses, skips, ranks, level choices
            assert value == two[key], key
    print(f"pointing {one['pointing.accuracy']:.3f} ({one['pointing.hits']} hits), attention "
          f"correctness |2 - 1| = {abs(one['pointing.attention_correctness'] - two['pointing.attention_correctness']):.1e}, "
          f"R@1 caption->image {one['retrieval.text_to_image.r1']:.1f}")


def flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for name, sub in tree.items() for k, v in flat(sub, f"{prefix}.{name}" if prefix
                                                                 else name).items()}
