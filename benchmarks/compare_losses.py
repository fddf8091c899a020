"""The training signals compared on the demo's data: pointing and retrieval on equal features.

Trains the heads on the full demo's training caches (``multigrounding demo`` first) once per
loss — the paper's two-way softmax (``multigrounding``), the bidirectional N-pair loss, VSE++'s
hardest-negative triplet loss, and the paper's loss plus the phrase-level term — with the demo's
settings (D = 128, batch 32, lr 2e-3, no decay), evaluates each on the demo's test images and
prints one Markdown table. With ``--seeds N`` each loss is trained N times (seeds 0 .. N-1: the
heads' initialisation and the batches) and the table gives the mean, the spread (min..max) and
every run: one seed cannot rank two configurations. The phrase term needs phrase labels: the synthetic captions carry their
phrases (Flickr30k style), so ``datasets phrases --model none`` labels them without a parser
(entities only), and the training manifest is extracted again under that name.

Run:  multigrounding demo && python benchmarks/compare_losses.py [--demo multigrounding-demo] [--epochs 5] [--seeds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, table  # noqa: E402

from multigrounding.datasets.phrase_labels import add_phrase_labels  # noqa: E402
from multigrounding.demo import PRESETS  # noqa: E402
from multigrounding.evaluation.report import Evaluation, evaluate_run  # noqa: E402
from multigrounding.heads.config import TrainConfig  # noqa: E402
from multigrounding.heads.run_folder import RunFolder  # noqa: E402
from multigrounding.heads.trainer import train  # noqa: E402
from multigrounding.pipeline.image_task import ImageExtraction, extract_images  # noqa: E402
from multigrounding.pipeline.text_task import TextExtraction, extract_text  # noqa: E402

RUNS = [("multigrounding", {"loss": "multigrounding"}),
        ("npair", {"loss": "npair"}),
        ("triplet-hard", {"loss": "triplet-hard"}),
        ("multigrounding + phrase-loss 1", {"loss": "multigrounding", "phrase_loss": 1.0})]


def labelled_caches(root: Path) -> tuple[Path, Path]:
    manifest = root / "data" / "train" / "labelled.jsonl"
    if not manifest.exists():
        add_phrase_labels(root / "data" / "train" / "manifest.jsonl", manifest, model=None)
    images, text = root / "cache" / "train-labelled-images", root / "cache" / "train-labelled-text"
    extract_images(ImageExtraction(manifest, images, scheduler="synchronous"))
    extract_text(TextExtraction(manifest, text, scheduler="synchronous"))
    return images, text


def run(root: Path, name: str, options: dict, epochs: int, images: Path, text: Path,
        seed: int = 0) -> dict:
    preset = PRESETS["full"]
    folder = name.replace(" ", "").replace("+", "_")
    # seed 0 keeps the folder of the one-seed comparison, so its runs are reused
    out = root / "compare" / (folder if seed == 0 else f"{folder}-seed{seed}")
    config = TrainConfig(images=str(images), text=str(text), out=str(out), epochs=epochs,
                         batch_size=preset.batch_size, lr=preset.lr, lr_milestones=[], dim=preset.dim,
                         seed=seed, **{"level_selection": "paper", **options})
    started = time.perf_counter()
    train(config, resume=RunFolder(config.out).continues(config))
    seconds = time.perf_counter() - started
    metrics = evaluate_run(Evaluation(out, root / "data" / "test" / "manifest.jsonl",
                                      root / "cache" / "test-images", root / "cache" / "test-text",
                                      out / "report", checkpoint="last", pictures=0))
    return {"name": name, "seed": seed, "seconds": seconds, "pointing": metrics["pointing"],
            "retrieval": metrics["retrieval"]}


def spread(values: list[float], spec: str = ".1f") -> str:
    """``mean [min..max]`` of the runs, or the one value."""
    if len(values) == 1:
        return format(values[0], spec)
    return (f"{format(statistics.mean(values), spec)} [{format(min(values), spec)}.."
            f"{format(max(values), spec)}]")


def summary_rows(results: list[dict]) -> list[list[str]]:
    """One row per loss: mean [min..max] over its seeds of each figure."""
    rows = []
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r for r in results if r["name"] == name]
        rows.append([name, spread([100 * r["pointing"]["accuracy"] for r in runs]),
                     spread([100 * r["pointing"]["attention_correctness"] for r in runs]),
                     spread([r["retrieval"]["text_to_image"]["r1"] for r in runs]),
                     spread([r["retrieval"]["image_to_text"]["r1"] for r in runs]),
                     spread([r["retrieval"]["rsum"] for r in runs]),
                     spread([r["seconds"] for r in runs], ".0f")])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("multigrounding-demo"),
                        help="the demo's --out folder (default multigrounding-demo)")
    parser.add_argument("--epochs", type=int, default=PRESETS["full"].epochs)
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per loss, seeds 0 .. N-1 (default 1)")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    root = args.demo / "full"
    if not (root / "cache" / "test-text").is_dir():
        raise SystemExit(f"{root}: no demo data; run `multigrounding demo --out {args.demo}` first")
    print(machine_line(), flush=True)
    plain = (root / "cache" / "train-images", root / "cache" / "train-text")
    labelled = labelled_caches(root)
    results = []
    for seed in range(args.seeds):
        for name, options in RUNS:
            caches = labelled if options.get("phrase_loss") else plain
            results.append(run(root, name, options, args.epochs, *caches, seed=seed))
            print(f"  {name}, seed {seed}: {100 * results[-1]['pointing']['accuracy']:.1f} % pointing, "
                  f"trained in {results[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    baseline = results[0]["pointing"]
    print(f"\n{baseline['hits'] + baseline['misses']} test phrases (center baseline "
          f"{100 * baseline['center_baseline']:.1f} %, random {100 * baseline['random_baseline']:.1f} %); "
          f"{results[0]['retrieval']['captions']} captions x {results[0]['retrieval']['images']} images; "
          f"{args.epochs} epochs each; " + (f"mean [min..max] over seeds 0..{args.seeds - 1}"
                                            if args.seeds > 1 else "seed 0") + "\n")
    print(table(["loss", "pointing %", "attention correctness %", "R@1 caption→image",
                 "R@1 image→caption", "rsum", "train s"], summary_rows(results)))
    if args.seeds > 1:
        print("\nEach run (pointing % / attention correctness % / rsum):\n")
        names = list(dict.fromkeys(r["name"] for r in results))
        print(table(["loss"] + [f"seed {s}" for s in range(args.seeds)],
                    [[name] + [f"{100 * r['pointing']['accuracy']:.1f} / "
                               f"{100 * r['pointing']['attention_correctness']:.1f} / "
                               f"{r['retrieval']['rsum']:.1f}"
                               for r in results if r["name"] == name] for name in names]))
    (root / "compare").mkdir(exist_ok=True)
    (root / "compare" / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
