"""Multi-process head training (heads/distributed.py): real gloo processes against one process.

Two processes holding half a global batch each must give the loss one process gives on the
whole batch, and — after DistributedDataParallel averages them — the same gradients, for every
loss and for the phrase term; three Adam steps must end at the same weights. Every worker of a
test runs all its cases in one spawn (a process start costs seconds on this machine).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from multigrounding.heads import distributed
from multigrounding.heads.config import TrainConfig
from multigrounding.heads.data import Batch, BatchLabels
from multigrounding.heads.distributed import DistributedError, Launch, batch_part
from multigrounding.heads.losses import phrase_matching_loss
from multigrounding.heads.model import GroundingHeads, HeadsConfig
from multigrounding.heads.scores import cross_scores
from multigrounding.heads.trainer import _step, training_loss

WORLD = 2
BATCH = 8
HEADS = dict(visual_channels=[5, 7, 6], text_layers=3, text_dim=10, sentence_vectors=2, dim=12)
GRID = 3
# (name, TrainConfig fields, epoch): every loss, both triplet modes, every term choice, phrases
CASES = [
    ("multigrounding-both", dict(loss="multigrounding", loss_terms="both"), 0),
    ("multigrounding-word", dict(loss="multigrounding", loss_terms="word"), 0),
    ("multigrounding-sentence", dict(loss="multigrounding", loss_terms="sentence"), 0),
    ("npair", dict(loss="npair"), 0),
    ("triplet-hardest", dict(loss="triplet-hard", triplet_warmup=1), 3),
    ("triplet-warmup", dict(loss="triplet-hard", triplet_warmup=1), 0),
    ("multigrounding-phrase", dict(loss="multigrounding", phrase_loss=0.7), 0),
    ("npair-phrase-softmax", dict(loss="npair", phrase_loss=0.5, heatmap="softmax"), 0),
]

# the level-selection recipes (heads/level_selection.py): every level's scores gathered, dropout
# drawn for the whole batch; pinned against one process's `_step` (itself pinned against the
# written-out formula in tests/test_level_selection.py)
LEVEL_CASES = [
    ("aux+calibrate+guide", dict(level_selection="aux+calibrate+guide"), 0),
    ("dropout+soft", dict(level_selection="dropout+soft", level_dropout=0.4), 0),
    ("aux-word-phrase", dict(level_selection="aux+soft", loss_terms="word", phrase_loss=0.5), 0),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second torch thread only spins against the worker processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_config(**fields) -> TrainConfig:
    # a large weight decay makes a penalty counted N times (or 1/N) visible in the gradients
    # the written-out reference is the paper's loss; LEVEL_CASES name their recipe
    return TrainConfig(images="-", text="-", out="-", weight_decay=0.05,
                       **{"level_selection": "paper", **fields})


def global_batch(seed: int, size: int = BATCH) -> Batch:
    """A batch shaped like the cache's (float16, channels last, zero-padded words), captions of
    1..7 words (the two halves' longest differ), and phrase labels with negatives."""
    rng = np.random.default_rng(seed)
    visual = [rng.standard_normal((size, GRID, GRID, c)).astype(np.float16)
              for c in HEADS["visual_channels"]]
    lengths = rng.integers(1, 8, size)
    lengths[0], lengths[-1] = 7, 3
    width = int(lengths.max())
    mask = np.arange(width)[None, :] < lengths[:, None]
    tokens = rng.standard_normal((size, width, HEADS["text_layers"], HEADS["text_dim"]))
    tokens = (tokens * mask[:, :, None, None]).astype(np.float16)
    sentence = rng.standard_normal((size, HEADS["sentence_vectors"], HEADS["text_dim"]))
    caption, positions = [], []
    for b in range(size):
        for _ in range(int(rng.integers(0, 3))):
            count = int(rng.integers(1, lengths[b] + 1))
            positions.append(np.sort(rng.choice(lengths[b], count, replace=False)))
            caption.append(b)
    span = max(len(p) for p in positions)
    position_array = np.zeros((len(positions), span), dtype=np.int64)
    position_mask = np.zeros((len(positions), span), dtype=bool)
    for q, p in enumerate(positions):
        position_array[q, :len(p)], position_mask[q, :len(p)] = p, True
    caption = np.array(caption, dtype=np.int64)
    negative = rng.random((len(caption), size)) < 0.7
    negative[np.arange(len(caption)), caption] = False
    labels = BatchLabels(caption, position_array, position_mask, negative)
    return Batch(np.arange(size), np.arange(size), visual, tokens, mask,
                 sentence.astype(np.float16), labels)


def batch_share(batch: Batch, part: slice) -> Batch:
    """What one process reads: its rows of features, words padded to its own longest caption,
    and the phrase labels of the whole batch."""
    mask = batch.mask[part]
    width = int(mask.sum(1).max())
    return Batch(batch.image_rows[part], batch.caption_rows[part],
                 [level[part] for level in batch.visual], batch.tokens[part, :width],
                 mask[:, :width], batch.sentence[part], batch.labels)


def make_heads(dtype: torch.dtype) -> GroundingHeads:
    """Heads at a point a run passes through, with non-zero biases. (At initialisation the
    biases are 0, the text mappings are positively homogeneous and the words L2-normalised, so
    the word mix's scale gamma has a gradient of exactly 0; Adam's first step then moves it by
    about lr·sign(roundoff), in one process as in two — a float32 comparison would measure the
    roundoff, not the maths.)"""
    torch.manual_seed(0)
    heads = GroundingHeads(HeadsConfig(**HEADS))
    with torch.no_grad():
        for name, parameter in heads.named_parameters():
            if name.endswith("bias"):
                parameter.uniform_(-0.1, 0.1)
    return heads.to(dtype)


def reference(batch: Batch, config: TrainConfig, epoch: int) -> tuple[dict, dict]:
    """One process, written out from METHOD.md without the trainer's step: the loss terms and
    every parameter's gradient (None where the loss does not reach it)."""
    heads = make_heads(torch.float64)
    visual = heads.map_visual([torch.from_numpy(level).double() for level in batch.visual])
    words = heads.map_words(torch.from_numpy(batch.tokens).double())
    sentence = heads.map_sentence(torch.from_numpy(batch.sentence).double())
    mask = torch.from_numpy(batch.mask)
    r_w, r_s = cross_scores(words, mask, sentence, visual, gamma1=config.gamma1,
                            heatmap=config.heatmap)
    terms = training_loss(r_w, r_s, heads.l2_penalty(), config, epoch)
    if config.phrase_loss > 0:
        labels = batch.labels
        caption = torch.from_numpy(labels.caption)
        label_words = words[caption[:, None], torch.from_numpy(labels.positions)]
        scores, _ = cross_scores(label_words, torch.from_numpy(labels.mask), None, visual,
                                 gamma1=config.gamma1, heatmap=config.heatmap)
        terms["phrase"] = phrase_matching_loss(scores, caption, torch.from_numpy(labels.negative),
                                               config.gamma2)
        terms["loss"] = terms["loss"] + config.phrase_loss * terms["phrase"]
    terms["loss"].backward()
    grads = {name: None if p.grad is None else p.grad.clone()
             for name, p in heads.named_parameters()}
    return {k: float(v.detach()) for k, v in terms.items() if v is not None}, grads


def wrap(heads: GroundingHeads):
    """DDP as the trainer will use it."""
    return distributed.wrap(heads, torch.device("cpu"))


def _join(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    distributed.start(Launch(rank=rank, world_size=WORLD, local_rank=rank), "cpu",
                      init_method=f"file://{init_file}", timeout_s=120)


# three Adam steps: the paper's loss with the phrase term, and a run with one term off whose
# triplet loss switches from warm-up to hardest midway
ADAM_RUNS = [("multigrounding-phrase", dict(loss="multigrounding", phrase_loss=0.5), (0, 0, 0)),
             ("triplet-word", dict(loss="triplet-hard", loss_terms="word", triplet_warmup=1),
              (0, 1, 1))]
ADAM_SEEDS = (11, 12, 13)


def _worker(rank: int, init_file: str, out: str) -> None:
    """Every case: one `_step` on this process's share (SGD at lr 0 keeps the weights and leaves
    the averaged gradients in .grad); then the Adam runs in float32."""
    _join(rank, init_file)
    try:
        share = batch_share(global_batch(1), batch_part(BATCH, rank, WORLD))
        one_step = {}
        for name, fields, epoch in CASES + LEVEL_CASES:
            model = wrap(make_heads(torch.float64))
            optimiser = torch.optim.SGD(model.parameters(), lr=0.0)
            terms = _step(model, optimiser, share, train_config(**fields), "cpu", epoch)
            grads = {n: None if p.grad is None else p.grad.clone()
                     for n, p in model.module.named_parameters()}
            one_step[name] = (terms, grads)
        adam = {}
        for name, fields, epochs in ADAM_RUNS:
            model = wrap(make_heads(torch.float32))
            optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
            for seed, epoch in zip(ADAM_SEEDS, epochs):
                part = batch_part(BATCH, rank, WORLD)
                _step(model, optimiser, batch_share(global_batch(seed), part),
                      train_config(**fields), "cpu", epoch)
            adam[name] = model.module.state_dict()
        torch.save({"one_step": one_step, "adam": adam}, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.stop()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    """What each of two real gloo processes computed (one spawn for every test that needs it)."""
    out = tmp_path_factory.mktemp("two-processes")
    mp.spawn(_worker, args=(str(out / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def max_difference(a: dict, b: dict) -> float:
    """Largest absolute difference over every parameter's gradient; None only matches None."""
    assert a.keys() == b.keys()
    worst = 0.0
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            worst = max(worst, float((a[name] - b[name]).abs().max()))
    return worst


def test_two_processes_match_one_in_loss_and_gradients(two_processes):
    batch = global_batch(1)
    report = []
    for name, fields, epoch in CASES:
        expected_terms, expected_grads = reference(batch, train_config(**fields), epoch)
        assert any(g is not None and g.abs().max() > 0 for g in expected_grads.values())
        for rank, results in enumerate(two_processes):
            terms, grads = results["one_step"][name]
            for key, value in expected_terms.items():
                assert abs(terms[key] - value) <= 1e-10, (name, rank, key, terms[key], value)
            difference = max_difference(grads, expected_grads)
            assert difference <= 1e-8, (name, rank, difference)
            report.append(f"{name} rank {rank}: loss {abs(terms['loss'] - expected_terms['loss']):.1e}"
                          f" grad {difference:.1e}")
        accuracies = [results["one_step"][name][0]["batch_retrieval_accuracy"]
                      for results in two_processes]
        assert accuracies[0] == accuracies[1]
    print("\n".join(report))


def test_two_processes_match_one_under_the_level_selection_recipes(two_processes):
    batch = global_batch(1)
    for name, fields, epoch in LEVEL_CASES:
        heads = make_heads(torch.float64)
        expected_terms = _step(heads, torch.optim.SGD(heads.parameters(), lr=0.0), batch,
                               train_config(**fields), "cpu", epoch)
        expected_grads = {n: None if p.grad is None else p.grad for n, p in heads.named_parameters()}
        for rank, results in enumerate(two_processes):
            terms, grads = results["one_step"][name]
            assert terms.keys() == expected_terms.keys(), name
            for key, value in expected_terms.items():
                assert abs(terms[key] - value) <= 1e-10, (name, rank, key, terms[key], value)
            assert max_difference(grads, expected_grads) <= 1e-8, (name, rank)


def test_one_process_step_matches_the_written_out_reference():
    """Without a process group the gathers are the identity: `_step` is the old single step."""
    batch = global_batch(1)
    for name, fields, epoch in CASES:
        config = train_config(**fields)
        heads = make_heads(torch.float64)
        terms = _step(heads, torch.optim.SGD(heads.parameters(), lr=0.0), batch, config, "cpu", epoch)
        expected_terms, expected_grads = reference(batch, config, epoch)
        grads = {n: None if p.grad is None else p.grad for n, p in heads.named_parameters()}
        assert max_difference(grads, expected_grads) <= 1e-12, name
        assert abs(terms["loss"] - expected_terms["loss"]) <= 1e-12, name


@pytest.mark.parametrize("run", [name for name, _, _ in ADAM_RUNS])
def test_three_adam_steps_in_two_processes_end_at_one_process_weights(two_processes, run):
    _, fields, epochs = next(r for r in ADAM_RUNS if r[0] == run)
    heads = make_heads(torch.float32)
    optimiser = torch.optim.Adam(heads.parameters(), lr=1e-3)
    start = {k: v.clone() for k, v in heads.state_dict().items()}
    for seed, epoch in zip(ADAM_SEEDS, epochs):
        _step(heads, optimiser, global_batch(seed), train_config(**fields), "cpu", epoch)
    expected = heads.state_dict()
    moved = max(float((expected[k] - start[k]).abs().max()) for k in expected)
    assert moved > 1e-3                      # the steps did move the weights
    for rank, results in enumerate(two_processes):
        weights = results["adam"][run]
        worst = max(float((weights[k] - expected[k]).abs().max()) for k in expected)
        print(f"{run} rank {rank}: max |w - w_single| = {worst:.1e} (moved {moved:.1e})")
        assert worst <= 1e-6, (rank, worst)


# ---------------------------------------------------------------------- launcher environment
def test_launch_reads_torchrun_environment():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.2",
           "MASTER_PORT": "29500"}
    assert Launch.from_env(env) == Launch(1, 4, 1, "10.0.0.2", 29500)
    assert not Launch.from_env(env).is_main
    assert Launch.from_env({}) == Launch()
    assert not Launch.from_env({}).distributed
    assert Launch.from_env({"RANK": "0", "WORLD_SIZE": "1"}) == Launch()


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, "MASTER_PORT not set"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "0 <= RANK < WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
    ({"WORLD_SIZE": "2"}, "RANK is not set"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "0"},
     "MASTER_PORT=0"),
])
def test_launch_refuses_an_incomplete_environment(env, message):
    with pytest.raises(DistributedError, match=message):
        Launch.from_env(env)


def test_batch_part_splits_in_rank_order_and_refuses_a_remainder():
    assert [batch_part(32, r, 4) for r in range(4)] == [slice(0, 8), slice(8, 16), slice(16, 24),
                                                        slice(24, 32)]
    assert batch_part(32, 0, 1) == slice(0, 32)
    with pytest.raises(DistributedError, match=r"--batch-size 30 does not split among 4 .*28 or 32"):
        batch_part(30, 1, 4)


def test_without_a_process_group_the_gathers_are_the_identity():
    words, mask, sentence = torch.randn(3, 4, 5), torch.ones(3, 4, dtype=torch.bool), torch.randn(3, 5)
    gathered = distributed.gather_text(words, mask, sentence)
    assert all(a is b for a, b in zip(gathered, (words, mask, sentence)))
    assert distributed.gather_columns(sentence) is sentence
    assert distributed.world() == (0, 1)


# ------------------------------------------------------------------------- one process dies
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KILL_WORKER = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_distributed import BATCH, WORLD, batch_share, global_batch, make_heads, train_config, wrap
    from multigrounding.heads import distributed
    from multigrounding.heads.trainer import _step
    torch.set_num_threads(1)
    launch = distributed.Launch.from_env()
    distributed.start(launch, "cpu", timeout_s=30)
    model = wrap(make_heads(torch.float32))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    share = batch_share(global_batch(1), distributed.batch_part(BATCH, launch.rank, WORLD))
    step = 0
    while True:
        _step(model, optimiser, share, train_config(), "cpu")
        step += 1
        if step == 3:
            Path({ready!r} + str(launch.rank)).touch()
""")


def test_killing_one_process_stops_the_other_within_a_minute(tmp_path):
    """kill -9 of rank 1 mid-run: rank 0 (started by env://, as torchrun would) exits non-zero
    in bounded time instead of waiting forever in a collective."""
    code = KILL_WORKER.format(tests=str(Path(__file__).parent), ready=str(tmp_path / "ready"))
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{r}").exists() for r in range(WORLD)):
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "the workers never got going"
            time.sleep(0.1)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed = time.monotonic()
        output, _ = procs[0].communicate(timeout=60)
        took = time.monotonic() - killed
        print(f"rank 0 exited {procs[0].returncode} {took:.1f} s after rank 1 was killed")
        assert procs[0].returncode != 0, output.decode()[-2000:]
        assert took < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


TORCHRUN_WORKER = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_distributed import BATCH, batch_share, global_batch, make_heads, train_config, wrap
    from multigrounding.heads import distributed
    from multigrounding.heads.trainer import _step
    launch = distributed.Launch.from_env()
    with distributed.process_group(launch, "cpu", timeout_s=60):
        model = wrap(make_heads(torch.float64))
        part = distributed.batch_part(BATCH, launch.rank, launch.world_size)
        terms = _step(model, torch.optim.SGD(model.parameters(), lr=0.0),
                      batch_share(global_batch(1), part), train_config(**{fields!r}), "cpu")
        if launch.is_main:
            with open({out!r}, "w") as handle:
                json.dump({{"terms": terms, "launch": list(launch.__dict__.values())}}, handle)
    assert distributed.world() == (0, 1)
""")


@pytest.mark.slow
def test_torchrun_launches_a_step_equal_to_one_process(tmp_path):
    """The real launcher: torchrun's environment is read, the group formed over env:// (TCP),
    and the two processes' loss is the single-process loss."""
    fields = dict(loss="multigrounding", phrase_loss=0.7)
    script = tmp_path / "worker.py"
    script.write_text(TORCHRUN_WORKER.format(tests=str(Path(__file__).parent), fields=fields,
                                             out=str(tmp_path / "rank0.json")))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", str(WORLD), str(script)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "rank0.json").read_text())
    rank, world_size, local_rank, address, port = result["launch"]
    assert (rank, world_size, local_rank) == (0, WORLD, 0) and address and port
    expected, _ = reference(global_batch(1), train_config(**fields), 0)
    for key, value in expected.items():
        assert abs(result["terms"][key] - value) <= 1e-10, key


# ------------------------------------------------------------------------- stopping between steps
def test_one_process_stops_between_steps_and_at_once_on_a_second_ctrl_c():
    """Real signals to this process: the first Ctrl-C or SIGTERM only asks the loop to stop after
    its step; a second Ctrl-C interrupts at once; restore puts Python's handlers back."""
    default_int, default_term = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    stops = distributed.StopRequests(torch.device("cpu")).install()
    try:
        assert not stops.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.requested()                    # still running: the step would finish
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)                           # the handler runs here at the latest
    finally:
        stops.restore()
    assert signal.getsignal(signal.SIGINT) is default_int
    assert signal.getsignal(signal.SIGTERM) is default_term
