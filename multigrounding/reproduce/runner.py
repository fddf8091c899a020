"""Running a recipe: convert → extract → train → evaluate, each stage through the library's own
functions, each resuming, then WORK_DIR/results.md and results.json.

WORK_DIR holds everything a run makes, one folder per stage:

```
WORK_DIR/
  data/<dataset>-<split>/manifest.jsonl, convert.json      datasets convert (+ what it read)
  cache/<dataset>-<split>-images, -text (+ .done.json)      extract images / extract text
  runs/seed<N>/                                             train (best.pt by validation)
  reports/seed<N>/<dataset>-<split>/                        evaluate (metrics.json, report.md)
  results.md, results.json
```

A stage whose output is complete and was made from the same inputs is skipped: a manifest whose
``convert.json`` names the same source files (size and modification time) and version; a store
whose ``.done.json`` names the same job and manifest and whose shards are all done; a run whose
last checkpoint has every epoch; a report of the checkpoint evaluation would use. Anything else is
(re)done, and the stages' own resumption finishes what an interrupted run left: extraction shard
by shard, training from its last checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from multigrounding import __version__
from multigrounding.atomic import atomic_open
from multigrounding.cache.fingerprint import file_sha256
from multigrounding.cache.image_store import ImageFeatureStore
from multigrounding.cache.store import CacheError
from multigrounding.cache.text_store import TextFeatureStore
from multigrounding.datasets.convert import convert_dataset
from multigrounding.errors import MultigroundingError
from multigrounding.evaluation.phrase_pointing import pointing_validator
from multigrounding.evaluation.protocols import plural
from multigrounding.evaluation.report import METRICS_FILE, evaluate_run
from multigrounding.heads.checkpoint import Checkpoint, CheckpointError, checkpoint_path
from multigrounding.heads.level_selection import level_choice
from multigrounding.heads.run_folder import CONFIG_FILE, RunFolder
from multigrounding.heads.trainer import train
from multigrounding.pipeline.image_task import extract_images
from multigrounding.pipeline.text_task import extract_text
from multigrounding.reproduce.recipe import DataSplit, Recipe
from multigrounding.reproduce.results import SeedResult, write_results
from multigrounding.reproduce.sources import ELMO_PAGE, NeededFile, get_source

log = logging.getLogger(__name__)

STAGES = ("convert", "extract", "train", "evaluate")
CONVERT_MARKER = "convert.json"
MANIFEST = "manifest.jsonl"


class ReproduceError(MultigroundingError, RuntimeError):
    """A reproduction cannot go on: a stage failed in a way a rerun would not fix by itself."""


@dataclass
class Reproduction:
    """What one ``reproduce`` run did: where, which stages ran or were skipped, the results."""

    work: Path
    stopped_after: str
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    results: dict | None = None
    seconds: float = 0.0


@dataclass
class _Context:
    recipe: Recipe
    data: Path
    work: Path
    device: str | None
    stage: Callable[[str], None]
    progress: Callable[[str, int, int], None]
    summary: Reproduction


def reproduce(recipe: Recipe, data_root: str | os.PathLike, work: str | os.PathLike, *,
              device: str | None = None, until: str = "evaluate", seeds: int = 1,
              stage: Callable[[str], None] | None = None,
              progress: Callable[[str, int, int], None] | None = None) -> Reproduction:
    """Run ``recipe`` on the datasets under ``data_root`` into ``work``, up to stage ``until``.

    ``seeds`` runs are trained (the recipe's seed, +1, ...) and each is evaluated on every test
    set. ``stage(message)`` is called as each step starts (lines starting ``[convert]``,
    ``[extract]``, ``[train]``, ``[evaluate]``, ``[results]``), ``progress(key, done, total)``
    within one.
    """
    if until not in STAGES:
        raise ReproduceError(f"--until {until!r}: choose from {', '.join(STAGES)}")
    if seeds < 1:
        raise ReproduceError(f"--seeds {seeds}: at least one run")
    started = time.perf_counter()
    data_root, work = Path(data_root).resolve(), Path(work).resolve()
    missing = [item for item in needed_files(recipe) if not item.present(data_root)]
    if missing:
        raise ReproduceError(f"{data_root / missing[0].path}: not found ({missing[0].what}; get "
                             f"it as {missing[0].get}); {len(missing)} files missing in all: "
                             f"`multigrounding reproduce {recipe.command_name} --data {data_root} --check` "
                             f"lists them")
    summary = Reproduction(work, until)
    ctx = _Context(recipe, data_root, work, device, stage or (lambda message: None),
                   progress or (lambda key, done, total: None), summary)
    work.mkdir(parents=True, exist_ok=True)
    with atomic_open(work / "recipe.toml", "w", encoding="utf-8") as handle:
        handle.write(recipe.toml)       # the recipe this run followed, for the record

    splits = _splits(recipe)
    manifests = {split.key: _convert(ctx, split) for split in splits}
    if until == "convert":
        return _finish(summary, started)
    alone = {t.data.key for t in recipe.tests if t.mode == "query"}
    caches = {split.key: _extract(ctx, split, manifests[split.key], split.key in alone)
              for split in splits}
    if until == "extract":
        return _finish(summary, started)
    base_seed = recipe.training.get("seed", 0)
    runs = {seed: _train(ctx, seed, manifests, caches) for seed in range(base_seed, base_seed + seeds)}
    if until == "train":
        return _finish(summary, started)
    seed_results = []
    for seed, run in runs.items():
        reports = {test.data.key: _evaluate(ctx, seed, run, test, manifests, caches)
                   for test in recipe.tests}
        seed_results.append(SeedResult(seed, run, reports))
    ctx.stage(f"[results] writing {work / 'results.md'} and {work / 'results.json'}")
    summary.results = write_results(recipe, data_root, work, seed_results,
                                    {key: _convert_record(path) for key, path in manifests.items()})
    return _finish(summary, started)


def _finish(summary: Reproduction, started: float) -> Reproduction:
    summary.seconds = time.perf_counter() - started
    return summary


def _splits(recipe: Recipe) -> list[DataSplit]:
    """Every dataset split the recipe reads, each once: train, validation, tests."""
    found: dict[str, DataSplit] = {}
    for split in [recipe.train, recipe.validation, *(t.data for t in recipe.tests)]:
        if split is not None:
            found.setdefault(split.key, split)
    return list(found.values())


# --------------------------------------------------------------------------- the files it needs

@dataclass(frozen=True)
class Needed:
    """A file or folder under DATA_ROOT the recipe needs, and which splits use it."""

    item: NeededFile
    used_by: tuple[str, ...]

    def present(self, root: Path) -> bool:
        return self.item.present(root)

    @property
    def path(self) -> str:
        return self.item.path

    @property
    def what(self) -> str:
        return self.item.what

    @property
    def get(self) -> str:
        return self.item.get


def needed_files(recipe: Recipe) -> list[Needed]:
    """Every file and folder of DATA_ROOT the recipe reads, in order, each once."""
    uses: dict[str, list[str]] = {}
    items: dict[str, NeededFile] = {}
    roles = [("train", recipe.train), ("validation", recipe.validation),
             *(("test", t.data) for t in recipe.tests)]
    for role, split in roles:
        if split is None:
            continue
        for item in get_source(split.dataset).needed(split.split):
            items.setdefault(item.path, item)
            uses.setdefault(item.path, []).append(f"{role} {split.key}")
    for path, what in recipe.data_files():
        get = (f"the {Path(path).name} file from {ELMO_PAGE}" if "ELMo" in what
               else "the weights file this recipe names")
        items.setdefault(path, NeededFile(path, what, get))
        uses.setdefault(path, []).append("models")
    return [Needed(items[path], tuple(dict.fromkeys(uses[path]))) for path in items]


# --------------------------------------------------------------------------- convert

def _convert(ctx: _Context, split: DataSplit) -> Path:
    source = get_source(split.dataset)
    folder = ctx.work / "data" / split.key
    manifest, marker = folder / MANIFEST, folder / CONVERT_MARKER
    sources, split_arg = source.convert_call(ctx.data, split.split)
    signature = {"format": source.format, "split": split_arg, "version": __version__,
                 "sources": [_file_signature(path) for path in sources]}
    recorded = _read_json(marker)
    if manifest.is_file() and recorded is not None and recorded.get("signature") == signature:
        ctx.stage(f"[convert] {split.key}: done ({recorded['written']} records in {manifest})")
        ctx.summary.skipped.append(f"convert {split.key}")
        return manifest
    ctx.stage(f"[convert] {split.key}: reading {source.title} ({source.format}) from "
              f"{ctx.data / source.folder}")
    folder.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    written = 0

    def count(n: int) -> None:
        nonlocal written
        written += n
        ctx.progress(f"convert {split.key}", written, 0)

    result = convert_dataset(source.format, sources, manifest, split=split_arg, progress=count)
    problems = [str(p) for p in list(result.problems)[:20]]
    split_files = [{"path": str(path), "sha256": file_sha256(path)}
                   for path in source.split_files(ctx.data, split.split)]
    with atomic_open(marker, "w", encoding="utf-8") as handle:
        json.dump({"signature": signature, "written": result.written, "skipped": result.skipped,
                   "problems": result.problems.count, "first_problems": problems,
                   "split_files": split_files, "seconds": result.seconds}, handle, indent=2)
    ctx.stage(f"[convert] {split.key}: {result.written} records, {result.skipped} skipped "
              f"({result.problems.count} problems) in {result.seconds:.1f} s")
    ctx.summary.ran.append(f"convert {split.key}")
    return manifest


def _file_signature(path: Path) -> list:
    stat = path.stat()
    return [str(path), stat.st_size if path.is_file() else None, stat.st_mtime_ns]


def _convert_record(manifest: Path) -> dict:
    return _read_json(manifest.parent / CONVERT_MARKER) or {}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- extract

def _extract(ctx: _Context, split: DataSplit, manifest: Path, phrases_alone: bool) -> dict[str, Path]:
    """Text first (it refuses over-long captions before any work), then images."""
    cache = ctx.work / "cache"
    text_job = ctx.recipe.text_job(manifest, cache / f"{split.key}-text", ctx.data,
                                   phrases_alone=phrases_alone, **_device(ctx))
    image_job = ctx.recipe.image_job(manifest, cache / f"{split.key}-images", ctx.data, **_device(ctx))
    stores = {}
    for kind, job, run, store_class in (("text", text_job, extract_text, TextFeatureStore),
                                        ("images", image_job, extract_images, ImageFeatureStore)):
        key = f"{split.key} {kind}"
        stores[kind] = Path(job.cache)
        marker = Path(f"{job.cache}.done.json")
        identity = _job_identity(job, manifest)
        if _complete(store_class, job.cache) and _read_json(marker) == identity:
            ctx.stage(f"[extract] {key}: done ({job.cache})")
            ctx.summary.skipped.append(f"extract {key}")
            continue
        what = (f"{job.backbone} ({job.weights})" if kind == "images" else job.encoder)
        ctx.stage(f"[extract] {key}: {what} into {job.cache}")
        marker.unlink(missing_ok=True)
        result = run(job, progress=lambda done, total, key=key: ctx.progress(f"extract {key}", done, total))
        if result.failed_shards:
            shard, error = result.failed_shards[0]
            raise ReproduceError(f"{job.cache}: {len(result.failed_shards)} shards failed (shard "
                                 f"{shard}: {error}); fix that and run the same command again: "
                                 f"it extracts only those")
        with atomic_open(marker, "w", encoding="utf-8") as handle:
            json.dump(identity, handle, indent=2)
        failed = f", {len(result.failed_items)} {result.unit} failed (cache info lists them)" \
            if result.failed_items else ""
        ctx.stage(f"[extract] {key}: {result.items} {result.unit} in {result.seconds:.1f} s{failed}")
        ctx.summary.ran.append(f"extract {key}")
    return stores


def _device(ctx: _Context) -> dict:
    return {"device": ctx.device} if ctx.device else {}


def _job_identity(job, manifest: Path) -> dict:
    """What made a store: the job's fields that shape the numbers, and the manifest's bytes."""
    skip = {"device", "scheduler", "workers", "overwrite", "batch_size", "decode_threads",
            "storage_options"}      # where and how fast it runs; options may hold credentials
    fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in skip}
    return {"job": json.loads(json.dumps(fields, default=str)), "manifest_sha256": file_sha256(manifest)}


def _complete(store_class, path) -> bool:
    try:
        return bool(store_class.open(path).done_shards().all())
    except (CacheError, OSError, KeyError, ValueError):
        return False


# --------------------------------------------------------------------------- train

def _train(ctx: _Context, seed: int, manifests: dict, caches: dict) -> Path:
    recipe = ctx.recipe
    out = ctx.work / "runs" / f"seed{seed}"
    train_stores = caches[recipe.train.key]
    validation = {}
    if recipe.validation is not None:
        val = caches[recipe.validation.key]
        validation = {"val_images": str(val["images"]), "val_text": str(val["text"]),
                      "val_manifest": str(manifests[recipe.validation.key])}
    config = recipe.train_config(images=str(train_stores["images"]), text=str(train_stores["text"]),
                                 out=str(out), seed=seed, **validation, **_device(ctx))
    folder = RunFolder(out)
    # refuses a folder holding a run of another config; where it runs (device, read-ahead) may
    # change between an interrupted run and its continuation
    resume = folder.continues(_as_saved(folder, config))
    if resume and _epochs_done(folder) >= config.epochs:
        ctx.stage(f"[train] seed {seed}: done ({config.epochs} epochs in {out})")
        ctx.summary.skipped.append(f"train seed {seed}")
        return out
    validate = None
    if config.val_manifest:
        validate = pointing_validator(config.val_images, config.val_text, config.val_manifest,
                                      batch_size=config.batch_size, heatmap=config.heatmap,
                                      level_choice=level_choice(config.level_selection))
    ctx.stage(f"[train] seed {seed}: {config.epochs} epochs, D = {config.dim}, batch "
              f"{config.batch_size}, lr {config.lr:g} into {out}" + (" (resuming)" if resume else ""))
    result = train(config, resume=resume, validate=validate,
                   progress=lambda m: ctx.progress(f"train seed {seed}", m["step"], 0))
    best = f", best validation pointing {100 * result.best_accuracy:.1f} %" \
        if result.best_accuracy is not None else ""
    ctx.stage(f"[train] seed {seed}: {result.epochs} epochs, {result.steps} steps in "
              f"{result.seconds:.1f} s{best}")
    ctx.summary.ran.append(f"train seed {seed}")
    return out


RUNTIME_FIELDS = ("device", "prefetch", "read_cache_gb", "log_every")


def _as_saved(folder: RunFolder, config):
    """``config`` with the runtime fields of the run already in ``folder`` (if any)."""
    if not (folder.path / CONFIG_FILE).is_file():
        return config
    saved = folder.config()
    return dataclasses.replace(config, **{name: getattr(saved, name) for name in RUNTIME_FIELDS})


def _epochs_done(folder: RunFolder) -> int:
    if not folder.last.is_file():
        return 0
    try:
        return Checkpoint.load(folder.last).epoch
    except CheckpointError:
        return 0


# --------------------------------------------------------------------------- evaluate

def _evaluate(ctx: _Context, seed: int, run: Path, test, manifests: dict, caches: dict) -> dict:
    key = test.data.key
    out = ctx.work / "reports" / f"seed{seed}" / key
    job = ctx.recipe.evaluation_job(test, run=run, manifest=manifests[key],
                                    images=caches[key]["images"], text=caches[key]["text"], out=out,
                                    **_device(ctx))
    checkpoint = checkpoint_path(run, job.checkpoint)
    previous = _read_json(out / METRICS_FILE)
    if (previous is not None and previous.get("checkpoint") == str(checkpoint)
            and previous.get("mode") == job.mode and previous.get("protocol") == job.protocol
            and (out / METRICS_FILE).stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns):
        ctx.stage(f"[evaluate] seed {seed}, {key}: done ({out / METRICS_FILE})")
        ctx.summary.skipped.append(f"evaluate seed {seed} {key}")
        return previous
    ctx.stage(f"[evaluate] seed {seed}, {key}: {checkpoint.name}, mode {job.mode}, protocol "
              f"{job.protocol}")
    metrics = evaluate_run(job, progress=lambda stage, done, total: ctx.progress(
        f"evaluate seed {seed} {key} {stage}", done, total))
    headline = metrics["protocols"][job.protocol]
    ctx.stage(f"[evaluate] seed {seed}, {key}: pointing {100 * headline['accuracy']:.1f} % over "
              f"{headline['scored']} {plural(headline['unit'])}")
    ctx.summary.ran.append(f"evaluate seed {seed} {key}")
    return metrics
