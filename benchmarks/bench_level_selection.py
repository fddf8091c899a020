"""The cost of a training step under each level-selection recipe, against the paper's, side by side.

One whole training step (mappings, all B×B scores, loss, backward, Adam) through the trainer's own
``_step``, on one batch shaped like the seed-spread runs' (B = 32 images of EfficientNet-Lite0's four
18×18 levels, MiniLM's 7 layers × 384 per word, captions of T = 12 words), for the paper's hard max
and each recipe, alternated and repeated; prints each recipe's time per step as a ratio to the
paper's (median and spread of the repeats). The recipes' forward is the paper's; their backward
works on every level instead of the selected one.

Run:  python benchmarks/bench_level_selection.py [--dim 128] [--repeats 7] [--recipes aux soft ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stat, machine_line, table  # noqa: E402

from multigrounding.heads.data import Batch  # noqa: E402
from multigrounding.heads.model import GroundingHeads, HeadsConfig  # noqa: E402
from multigrounding.heads.config import TrainConfig  # noqa: E402
from multigrounding.heads.trainer import _step  # noqa: E402

CHANNELS = [40, 112, 320, 1280]


def make_batch(batch: int, words: int, grid: int, seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    visual = [np.maximum(rng.standard_normal((batch, grid, grid, c)), 0).astype(np.float16) for c in CHANNELS]
    lengths = rng.integers(words // 2, words + 1, batch)
    mask = np.arange(words)[None] < lengths[:, None]
    return Batch(np.arange(batch), np.arange(batch), visual,
                 rng.standard_normal((batch, words, 7, 384)).astype(np.float16), mask,
                 rng.standard_normal((batch, 14, 384)).astype(np.float16))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--grid", type=int, default=18)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--recipes", nargs="+", default=["aux", "dropout", "soft", "aux+soft", "calibrate", "aux+calibrate"])
    parser.add_argument("--progress", type=float, default=0.0,
                        help="training progress for the soft selection (0: at its start, soft)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: steadiest on a shared machine; measured 5x faster than 2 "
                             "here under load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line())
    batch = make_batch(args.batch_size, args.words, args.grid)
    config = HeadsConfig(visual_channels=CHANNELS, text_layers=7, text_dim=384, sentence_vectors=14, dim=args.dim)
    recipes = ["paper", *args.recipes]
    runs = {}
    for recipe in recipes:
        torch.manual_seed(0)
        heads = GroundingHeads(config)
        runs[recipe] = (heads, torch.optim.Adam(heads.parameters(), lr=1e-4),
                        TrainConfig(images="-", text="-", out="-", dim=args.dim, level_selection=recipe))
    seconds = {recipe: [] for recipe in recipes}
    for repeat in range(args.repeats + 1):             # the first round warms up and is dropped
        for recipe in recipes if repeat % 2 == 0 else reversed(recipes):
            heads, optimiser, train_config = runs[recipe]
            tick = time.perf_counter()
            _step(heads, optimiser, batch, train_config, "cpu", 0, progress=args.progress)
            if repeat:
                seconds[recipe].append(time.perf_counter() - tick)
    paper = seconds["paper"]
    rows = [["paper", Stat(paper).fmt(".3f", " s"), "1"]]
    for recipe in args.recipes:
        ratios = [a / b for a, b in zip(seconds[recipe], paper)]
        rows.append([recipe, Stat(seconds[recipe]).fmt(".3f", " s"), Stat(ratios).fmt(".2f")])
    print(f"\nB = {args.batch_size}, T ≤ {args.words} words, {args.grid}×{args.grid} × 4 levels, D = {args.dim}; "
          f"{args.repeats} alternated repeats (median [min..max])\n")
    print(table(["recipe", "step time", "ratio to paper (same repeat)"], rows))


if __name__ == "__main__":
    main()
