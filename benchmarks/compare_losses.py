"""The training signals compared on the demo's data: pointing and retrieval on equal features.

Trains the heads on the full demo's training caches (``multigrounding demo`` first) once per
loss — the paper's two-way softmax (``multigrounding``), the bidirectional N-pair loss, VSE++'s
hardest-negative triplet loss, and the paper's loss plus the phrase-level term — with the demo's
settings (D = 128, batch 32, lr 2e-3, no decay), evaluates each on the demo's test images and
prints one Markdown table. The phrase term needs phrase labels: the synthetic captions carry their
phrases (Flickr30k style), so ``datasets phrases --model none`` labels them without a parser
(entities only), and the training manifest is extracted again under that name.

Run:  multigrounding demo && python benchmarks/compare_losses.py [--demo multigrounding-demo] [--epochs 5]
"""
from __future__ import annotations

import argparse
import json
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


def run(root: Path, name: str, options: dict, epochs: int, images: Path, text: Path) -> dict:
    preset = PRESETS["full"]
    out = root / "compare" / name.replace(" ", "").replace("+", "_")
    config = TrainConfig(images=str(images), text=str(text), out=str(out), epochs=epochs,
                         batch_size=preset.batch_size, lr=preset.lr, lr_milestones=[], dim=preset.dim,
                         **options)
    started = time.perf_counter()
    train(config, resume=RunFolder(config.out).continues(config))
    seconds = time.perf_counter() - started
    metrics = evaluate_run(Evaluation(out, root / "data" / "test" / "manifest.jsonl",
                                      root / "cache" / "test-images", root / "cache" / "test-text",
                                      out / "report", checkpoint="last", pictures=0))
    return {"name": name, "seconds": seconds, "pointing": metrics["pointing"],
            "retrieval": metrics["retrieval"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("multigrounding-demo"),
                        help="the demo's --out folder (default multigrounding-demo)")
    parser.add_argument("--epochs", type=int, default=PRESETS["full"].epochs)
    args = parser.parse_args()
    root = args.demo / "full"
    if not (root / "cache" / "test-text").is_dir():
        raise SystemExit(f"{root}: no demo data; run `multigrounding demo --out {args.demo}` first")
    print(machine_line(), flush=True)
    plain = (root / "cache" / "train-images", root / "cache" / "train-text")
    labelled = labelled_caches(root)
    results = []
    for name, options in RUNS:
        caches = labelled if options.get("phrase_loss") else plain
        results.append(run(root, name, options, args.epochs, *caches))
        print(f"  {name}: done in {results[-1]['seconds']:.0f} s", file=sys.stderr, flush=True)
    baseline = results[0]["pointing"]
    rows = [[r["name"], f"{100 * r['pointing']['accuracy']:.1f}",
             f"{100 * r['pointing']['attention_correctness']:.1f}",
             f"{r['retrieval']['text_to_image']['r1']:.1f}", f"{r['retrieval']['image_to_text']['r1']:.1f}",
             f"{r['retrieval']['rsum']:.1f}", f"{r['seconds']:.0f}"] for r in results]
    print(f"\n{baseline['hits'] + baseline['misses']} test phrases (center baseline "
          f"{100 * baseline['center_baseline']:.1f} %, random {100 * baseline['random_baseline']:.1f} %); "
          f"{results[0]['retrieval']['captions']} captions x {results[0]['retrieval']['images']} images; "
          f"{args.epochs} epochs each\n")
    print(table(["loss", "pointing %", "attention correctness %", "R@1 caption→image",
                 "R@1 image→caption", "rsum", "train s"], rows))
    (root / "compare").mkdir(exist_ok=True)
    (root / "compare" / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
