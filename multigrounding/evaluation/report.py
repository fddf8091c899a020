"""``evaluate``: a trained run against a test set's stores — metrics.json, report.md, pictures.

One pass of the pointing game (every scorable phrase once, with the center and random-point
baselines on the same phrases, attention correctness and level-selection rates), one blockwise
caption × image score matrix for retrieval R@K in both directions, then the files. Each file is
written atomically, so an interrupted evaluation never leaves a half report.

The pointing game is counted under both protocols of ``protocols.py`` every time (the same
heatmaps; counting is cheap): ``metrics.json`` holds both under ``protocols``, and
``Evaluation.protocol`` (``paper`` by default) chooses the headline — the first figure of
report.md and of the command's output. The per-category table, attention correctness and the
level rates are per phrase, as the paper reports them.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from multigrounding.atomic import atomic_open
from multigrounding.cache.image_store import ImageStoreConfig
from multigrounding.cache.location import Location
from multigrounding.cache.reader import TextBatchReader, VisualBatchReader
from multigrounding.cache.store import CacheMismatchError
from multigrounding.cache.text_store import TextStoreConfig
from multigrounding.datasets.images import open_image
from multigrounding.datasets.manifest import read_manifest
from multigrounding.devices import resolve_device
from multigrounding.errors import UnknownNameError
from multigrounding.evaluation.phrase_pointing import MODES, PointingResult, evaluate_pointing
from multigrounding.evaluation.pictures import overlay, save_png
from multigrounding.evaluation.protocols import PROTOCOL_TITLES, PROTOCOLS, plural
from multigrounding.evaluation.retrieval import fold_metrics, retrieval_metrics, score_matrix
from multigrounding.heads.checkpoint import Checkpoint, load_heads
from multigrounding.heads.level_selection import level_choice
from multigrounding.heads.scores import LEVEL_CHOICES
from multigrounding.settings import from_mapping, setting

METRICS_FILE, REPORT_FILE, PICTURES_DIR = "metrics.json", "report.md", "pictures"


@dataclass
class Evaluation:
    """Everything ``evaluate`` takes (one flat config; ``from_dict`` type-checks a JSON-like one,
    as a recipe's evaluation settings)."""

    run: Path = setting(None, "The trained run directory.", kind="path", path="dir",
                        required=True, cli=False)
    manifest: Path = setting(None, "The test manifest the stores were extracted from.",
                             kind="path", path="file", required=True, cli=False)
    images: str | Path = setting(None, "The test image feature store (a folder or a URL).",
                                 kind="path", path="store", required=True, cli=False)
    text: str | Path = setting(None, "The test text feature store (a folder or a URL).",
                               kind="path", path="store", required=True, cli=False)
    out: Path = setting(None, "Report folder: metrics.json, report.md, pictures/.", kind="path",
                        path="dir", required=True, cli=False)
    mode: str = setting("sentence", "sentence: phrases inside their caption use its word "
                        "heatmaps; query: every phrase is grounded alone by its sentence heatmap.",
                        kind="str", choices=MODES)
    protocol: str = setting("paper", "Which pointing-game count is the headline (both are "
                            "computed): paper (per phrase, any box) or wwbl (per entity, union "
                            "box).", kind="str", choices=PROTOCOLS)
    checkpoint: str = setting("best", "best (by validation; last when the run had none), last, "
                              "or a checkpoint file.", kind="str")
    pictures: int = setting(24, "How many phrases to draw (half hits, half misses).", kind="int",
                            minimum=0)
    seed: int = setting(0, "Which phrases are drawn.", kind="int")
    retrieval: bool = setting(True, "Also score every test caption against every test image.",
                              kind="bool")
    fold_size: int = setting(1000, "The COCO 1K protocol when there are more test images than "
                                   "this.", kind="int", minimum=1)
    batch_size: int = setting(32, "Sequences grounded per batch.", kind="int", minimum=1)
    device: str = setting("auto", "auto (cuda when there is one), cpu, cuda, cuda:1 ...", kind="str")
    level_choice: str | None = setting(None, "How each word's level is chosen for its heatmap: "
                                       "relevance (the paper's max) or focus (the most focused "
                                       "map) [default: the run's].", kind="str",
                                       choices=LEVEL_CHOICES)
    # for stores and images named by URL: given on the command line, never written or read from
    # a config (it may hold credentials)
    storage_options: dict | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, data, source: str = "evaluation") -> "Evaluation":
        return from_mapping(cls, data, source)


def check_same_models(saved: Checkpoint, image_store, text_store) -> None:
    """Refuse stores whose features come from other models than the ones the run was trained on."""
    for kind, config_class, trained, store in (
            ("image", ImageStoreConfig, saved.image_config, image_store),
            ("text", TextStoreConfig, saved.text_config, text_store)):
        if not trained:
            continue  # a checkpoint from before the configs were kept: nothing to compare
        want, got = config_class.from_json(trained).identity(), store.config.identity()
        if want != got:
            keys = [k for k in want if want[k] != got.get(k)]
            detail = "; ".join(f"{k}: run {_short(want[k])} vs cache {_short(got.get(k))}" for k in keys)
            raise CacheMismatchError(f"{store.path} holds {kind} features of another model than the "
                                     f"run {saved.path} was trained on ({detail}); extract them with "
                                     f"the run's model")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def evaluate_run(job: Evaluation, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Run the evaluation and write its files; returns the metrics. ``progress(stage, done, total)``."""
    started = time.perf_counter()
    device = resolve_device(job.device)
    heads, saved = load_heads(job.run, job.checkpoint, device)
    config = saved.config
    images = Location.parse(job.images, job.storage_options)
    text = Location.parse(job.text, job.storage_options)
    visual, words = VisualBatchReader(images), TextBatchReader(text)
    check_same_models(saved, visual.store, words.store)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)

    def pointing_progress(done: int, total: int) -> None:
        if progress is not None:
            progress("pointing", done, total)

    choice = job.level_choice or level_choice(config.get("level_selection"))
    pointing = evaluate_pointing(heads, images, text, job.manifest, mode=job.mode,
                                 device=device, batch_size=job.batch_size,
                                 heatmap=config["heatmap"], level_choice=choice,
                                 keep_heatmaps=job.pictures > 0, progress=pointing_progress)
    if job.protocol not in PROTOCOLS:
        raise UnknownNameError("protocol", job.protocol, PROTOCOLS)
    metrics = {"run": str(job.run), "checkpoint": saved.path, "epoch": saved.epoch,
               "step": saved.step, "manifest": str(job.manifest), "images": str(job.images),
               "text": str(job.text), "mode": job.mode, "protocol": job.protocol,
               "level_choice": choice,
               "protocols": {name: pointing.protocol(name).summary() for name in PROTOCOLS},
               "pointing": pointing.summary()}
    if job.retrieval:
        retrieval_started = time.perf_counter()
        image_rows, caption_rows, caption_image = retrieval_rows(visual.store, words.store)
        pairs, scored = len(image_rows) * len(caption_rows), 0

        def retrieval_progress(count: int) -> None:
            nonlocal scored
            scored += count
            if progress is not None:
                progress("retrieval", scored, pairs)

        scores = score_matrix(heads, visual, words, image_rows, caption_rows,
                              terms=config["loss_terms"], gamma1=config["gamma1"],
                              heatmap=config["heatmap"], device=device, progress=retrieval_progress)
        metrics["retrieval"] = retrieval_metrics(scores, caption_image)
        if len(image_rows) > job.fold_size:
            metrics["retrieval"]["folds"] = fold_metrics(scores, caption_image, job.fold_size)
        metrics["retrieval"]["scores"] = {"both": "word + sentence", "word": "word",
                                          "sentence": "sentence"}[config["loss_terms"]]
        retrieval_seconds = time.perf_counter() - retrieval_started
    else:
        retrieval_seconds = 0.0
    records = list(read_manifest(job.manifest))
    pictures = write_pictures(pointing, records, out / PICTURES_DIR, job.pictures, job.seed,
                              job.storage_options)
    metrics["pictures"] = pictures
    metrics["timing"] = {"seconds": time.perf_counter() - started,
                         "pointing_read_seconds": pointing.read_seconds,
                         "pointing_compute_seconds": pointing.compute_seconds,
                         "retrieval_seconds": retrieval_seconds,
                         "phrases_per_second": len(pointing.outcomes) /
                         max(pointing.read_seconds + pointing.compute_seconds, 1e-9)}
    with atomic_open(out / METRICS_FILE, "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    with atomic_open(out / REPORT_FILE, "w", encoding="utf-8") as handle:
        handle.write(render_report(metrics))
    return metrics


def retrieval_rows(image_store, text_store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The usable test images (columns), their captions (rows) and each caption's column."""
    usable = image_store.usable()
    image_rows = np.flatnonzero(usable)
    column = np.full(image_store.num_images, -1, np.int64)
    column[image_rows] = np.arange(len(image_rows))
    captions = text_store.captions()
    caption_rows = captions.usable(usable)
    return image_rows, caption_rows, column[captions.image[caption_rows]]


def sample_outcomes(pointing: PointingResult, count: int, seed: int) -> list[int]:
    """Up to ``count`` outcome indices, half hits and half misses where there are enough of each."""
    rng = np.random.default_rng(seed)
    hits = [i for i, o in enumerate(pointing.outcomes) if o.hit]
    misses = [i for i, o in enumerate(pointing.outcomes) if not o.hit]
    take_hits = min(len(hits), max(count // 2, count - len(misses)))
    take_misses = min(len(misses), count - take_hits)
    chosen = list(rng.choice(hits, take_hits, replace=False)) if take_hits else []
    chosen += list(rng.choice(misses, take_misses, replace=False)) if take_misses else []
    return sorted(int(i) for i in chosen)


def write_pictures(pointing: PointingResult, records, folder: Path, count: int, seed: int,
                   storage_options: dict | None = None) -> list[dict]:
    """Overlay pictures of a sample of phrases: heatmap, ground-truth boxes, the pointed pixel.
    Images named by URL are read with ``storage_options``."""
    listed = []
    for i in sample_outcomes(pointing, count, seed):
        outcome = pointing.outcomes[i]
        record = records[outcome.record]
        phrase = record.phrases[outcome.index]
        verdict = "hit" if outcome.hit else "miss"
        name = f"{verdict}-{_safe(record.id)}-{outcome.index}.png"
        image = open_image(record.image, storage_options)
        picture = overlay(image, outcome.heatmap, phrase.boxes, outcome.xy,
                          label=f"{phrase.text} ({verdict})")
        save_png(picture, folder / name)
        listed.append({"file": f"{PICTURES_DIR}/{name}", "image": record.id, "phrase": phrase.text,
                       "hit": outcome.hit, "point": outcome.xy,
                       "level": pointing.level_names[outcome.level]})
    return listed


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:60]


def render_report(metrics: dict) -> str:
    """report.md: the tables of metrics.json, for reading."""
    p = metrics["pointing"]
    lines = [f"# Evaluation of {metrics['run']}", "",
             f"Checkpoint `{metrics['checkpoint']}` (epoch {metrics['epoch']}, step {metrics['step']}); "
             f"test manifest `{metrics['manifest']}`; mode `{metrics['mode']}`; headline protocol "
             f"`{metrics.get('protocol', 'paper')}`.", "",
             "## Pointing game", ""]
    lines += protocol_lines(metrics)
    lines += ["", "Per phrase (the paper's counting), with attention correctness: "
              f"{p['hits'] + p['misses']} phrases scored ({p['hits']} hits, {p['misses']} misses), "
              f"{p['skipped']} skipped" + (" (" + ", ".join(f"{k}: {v}" for k, v in
                                                        sorted(p["skipped_by_reason"].items())) + ")"
                                          if p["skipped"] else "") + ".", "",
              "| category | phrases | accuracy | center baseline | random baseline | attention correctness |",
              "|---|---|---|---|---|---|",
              _row("**all**", p["hits"] + p["misses"], p)]
    lines += [_row(name, group["phrases"], group) for name, group in p["per_category"].items()]
    levels = p["level_selection"]
    names = list(levels["phrases"])
    entropy = levels.get("entropy_bits")
    chooser = {"relevance": "the level of highest relevance (the paper's max)",
               "focus": "the level whose heatmap is most focused"}[metrics.get("level_choice", "relevance")]
    lines += ["", "## Level selection", "", f"Each word grounds with {chooser}. How often each level "
              "is chosen (a phrase takes the level of its most relevant word; sentences their "
              "sentence heatmap's)"
              + (", and the entropy of those rates in bits (0: always one level; "
                 f"{np.log2(max(len(names), 1)):.0f}: all {len(names)} equally)" if entropy else "")
              + ".", "",
              "| | " + " | ".join(names) + (" | entropy |" if entropy else " |"),
              "|---" * (len(names) + 1 + bool(entropy)) + "|",
              _levels("**all phrases**", levels["phrases"], names, entropy and entropy["phrases"])]
    lines += [_levels(name, rates, names, entropy and entropy["per_category"][name])
              for name, rates in levels["per_category"].items()]
    lines.append(_levels("**sentences**", levels["sentences"], names, entropy and entropy["sentences"]))
    if "accuracy" in levels:
        lines += ["", "Pointing accuracy of the phrases that chose each level (— where none did):", "",
                  "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
                  _level_accuracy("**all phrases**", levels["accuracy"], names)]
        lines += [_level_accuracy(name, values, names)
                  for name, values in levels["per_category_accuracy"].items()]
    if "retrieval" in metrics:
        r = metrics["retrieval"]
        lines += ["", "## Retrieval", "",
                  f"{r['captions']} captions × {r['images']} images, scored by the {r['scores']} "
                  f"score; recall in %.", "",
                  "| direction | R@1 | R@5 | R@10 | median rank | mean rank |", "|---|---|---|---|---|---|"]
        protocols = [("", r)]
        if "folds" in r:
            protocols.append((f" (mean of {r['folds']['folds']} folds of {r['folds']['images']:g} "
                              f"images)", r["folds"]))
        for suffix, values in protocols:
            for direction, title in (("text_to_image", "caption → image"), ("image_to_text", "image → caption")):
                d = values[direction]
                lines.append(f"| {title}{suffix} | {d['r1']:.1f} | {d['r5']:.1f} | {d['r10']:.1f} | "
                             f"{d['median_rank']:g} | {d['mean_rank']:.1f} |")
        lines += ["", "rsum " + ", ".join(f"{values['rsum']:.1f}{suffix}" for suffix, values in protocols)]
    if metrics["pictures"]:
        lines += ["", "## Pictures", "", "Heatmap, ground-truth boxes (green) and the pointed pixel (red).", "",
                  "| picture | phrase | result | level |", "|---|---|---|---|"]
        lines += [f"| [{Path(x['file']).name}]({x['file']}) | {x['phrase']} | "
                  f"{'hit' if x['hit'] else 'miss'} | {x['level']} |" for x in metrics["pictures"]]
    t = metrics["timing"]
    lines += ["", f"{t['seconds']:.1f} s in all; pointing {t['phrases_per_second']:.0f} phrases/s "
              f"(reading {t['pointing_read_seconds']:.1f} s, computing {t['pointing_compute_seconds']:.1f} s).", ""]
    return "\n".join(lines)


def protocol_lines(metrics: dict) -> list[str]:
    """The headline protocol's count, then the other's, each named."""
    chosen = metrics.get("protocol", "paper")
    counted = metrics.get("protocols", {})
    order = [chosen] + [name for name in counted if name != chosen]
    lines = []
    for name in order:
        c = counted.get(name)
        if c is None:
            continue
        skipped = (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(c["skipped_by_reason"].items()))
                   + ")") if c["skipped"] else ""
        lead = "**Protocol" if name == chosen else "Also counted under protocol"
        close = "**" if name == chosen else ""
        lines.append(f"{lead} `{name}` ({PROTOCOL_TITLES[name]}): {100 * c['accuracy']:.1f} %{close} "
                     f"over {c['scored']} {plural(c['unit'])} ({c['hits']} hits, {c['misses']} misses, "
                     f"{c['phrases']} phrases), {c['skipped']} {plural(c['unit'])} skipped{skipped}; "
                     f"center baseline {100 * c['center_baseline']:.1f} %, random point "
                     f"{100 * c['random_baseline']:.1f} %.")
        lines.append("")
    return lines[:-1]


def _row(name: str, count: int, values: dict) -> str:
    return (f"| {name} | {count} | {100 * values['accuracy']:.1f} | {100 * values['center_baseline']:.1f} "
            f"| {100 * values['random_baseline']:.1f} | {100 * values['attention_correctness']:.1f} |")


def _levels(name: str, rates: dict, names: list[str], entropy: float | None = None) -> str:
    return (f"| {name} | " + " | ".join(f"{100 * rates[n]:.0f}%" for n in names)
            + (f" | {entropy:.2f} |" if entropy is not None else " |"))


def _level_accuracy(name: str, values: dict, names: list[str]) -> str:
    return f"| {name} | " + " | ".join("—" if values[n] is None else f"{100 * values[n]:.1f}"
                                       for n in names) + " |"
