"""Scoring every test phrase once with trained heads, from the feature stores and the manifest.

Flickr30k-style phrases (with ``caption`` and ``start``) take the weighted word heatmaps of their
words inside the encoded caption (``mode="sentence"``, the default); standalone queries (ReferIt,
Visual Genome) take the sentence heatmap of their own sequence at its best level. With
``mode="query"`` every phrase is grounded as a standalone query: its own encoding's sentence
heatmap (the text store must hold phrases encoded alone: ``extract text --phrases-alone``).
Each sequence is grounded once for all its phrases, and every caption's sentence-level choice is
counted for the level-selection rates.

The outcomes (hits, attention correctness, levels, categories) are the paper's, per phrase. The
result also keeps every test phrase with its pointed pixel, and the heatmaps of the entities
that have several mentions, so that ``protocols.count`` can count the same grounding under
either protocol (``PointingResult.protocol``); a phrase the paper skips as small but whose
entity WWbL scores is grounded for that alone.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from multigrounding.cache.fingerprint import file_sha256
from multigrounding.cache.image_store import OK
from multigrounding.cache.reader import TextBatchReader, VisualBatchReader
from multigrounding.cache.store import CacheMismatchError
from multigrounding.datasets.manifest import read_manifest
from multigrounding.errors import DatasetError, UnknownNameError
from multigrounding.evaluation.heatmap_metrics import (center_hit, is_hit, point_and_correctness,
                                                       random_hit_rate, skip_reason)
from multigrounding.evaluation.protocols import PhraseHeatmap, ProtocolCounts, count, units
from multigrounding.heads.distributed import all_sum, world
from multigrounding.heads.inference import (grid_of, map_images, map_text, phrase_heatmap,
                                            sentence_heatmap)
from multigrounding.heads.scores import sentence_grounding, word_grounding

MODES = ("sentence", "query")


@dataclass
class PhraseOutcome:
    record: int
    index: int
    category: str
    hit: bool
    correctness: float
    level: int                      # the level of the phrase's most relevant word (or the query's)
    xy: tuple[int, int] | None
    center_hit: bool
    random_hit: float               # expected hit rate of a uniformly random pixel
    heatmap: np.ndarray | None      # [M, M] float16, what was pointed with (None: all zero)


@dataclass
class PointingResult:
    outcomes: list[PhraseOutcome] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    sentence_levels: collections.Counter = field(default_factory=collections.Counter)
    level_names: list[str] = field(default_factory=list)
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    phrases: list[PhraseHeatmap] = field(default_factory=list)  # every test phrase, as grounded

    def protocol(self, name: str) -> ProtocolCounts:
        """The pointing game on these groundings counted under protocol ``name``."""
        return count(self.phrases, name)

    @property
    def hits(self) -> int:
        return sum(o.hit for o in self.outcomes)

    @property
    def accuracy(self) -> float:
        return self.hits / len(self.outcomes) if self.outcomes else 0.0

    def level_rates(self, levels: list[int]) -> dict[str, float]:
        counts = collections.Counter(levels)
        total = sum(counts.values())
        return {name: counts[k] / total if total else 0.0 for k, name in enumerate(self.level_names)}

    def level_accuracy(self, outcomes: list[PhraseOutcome]) -> dict[str, float | None]:
        """Per level, the pointing accuracy of the phrases that chose it (None: none did)."""
        chosen = {name: [o.hit for o in outcomes if o.level == k]
                  for k, name in enumerate(self.level_names)}
        return {name: float(np.mean(hits)) if hits else None for name, hits in chosen.items()}

    def summary(self) -> dict:
        """Everything metrics.json reports about pointing: accuracy, baselines, levels."""
        per_category: dict[str, list[PhraseOutcome]] = collections.defaultdict(list)
        for outcome in self.outcomes:
            per_category[outcome.category].append(outcome)
        sentence_levels = [k for k, n in self.sentence_levels.items() for _ in range(n)]
        return {"accuracy": self.accuracy, "hits": self.hits,
                "misses": len(self.outcomes) - self.hits,
                "skipped": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped),
                **_means(self.outcomes),
                "per_category": {name: {"phrases": len(group), "hits": sum(o.hit for o in group),
                                        **_means(group)}
                                 for name, group in sorted(per_category.items())},
                "level_selection": {
                    "phrases": self.level_rates([o.level for o in self.outcomes]),
                    "per_category": {name: self.level_rates([o.level for o in group])
                                     for name, group in sorted(per_category.items())},
                    "sentences": self.level_rates(sentence_levels),
                    "entropy_bits": {
                        "phrases": level_entropy(self.level_rates([o.level for o in self.outcomes])),
                        "per_category": {name: level_entropy(self.level_rates([o.level for o in group]))
                                         for name, group in sorted(per_category.items())},
                        "sentences": level_entropy(self.level_rates(sentence_levels))},
                    "accuracy": self.level_accuracy(self.outcomes),
                    "per_category_accuracy": {name: self.level_accuracy(group)
                                              for name, group in sorted(per_category.items())}}}


def level_entropy(rates: dict[str, float]) -> float:
    """The entropy in bits of level-selection rates: 0 when one level takes every choice,
    log2(L) when all L are chosen equally often."""
    return 0.0 - float(sum(p * np.log2(p) for p in rates.values() if p > 0))   # 0.0, never -0.0


def _means(outcomes: list[PhraseOutcome]) -> dict:
    if not outcomes:
        return {"accuracy": 0.0, "attention_correctness": 0.0, "center_baseline": 0.0,
                "random_baseline": 0.0}
    return {"accuracy": float(np.mean([o.hit for o in outcomes])),
            "attention_correctness": float(np.mean([o.correctness for o in outcomes])),
            "center_baseline": float(np.mean([o.center_hit for o in outcomes])),
            "random_baseline": float(np.mean([o.random_hit for o in outcomes]))}


@torch.no_grad()
def evaluate_pointing(heads, images: str | Path, text: str | Path, manifest: str | Path, *,
                      mode: str = "sentence", device: str = "cpu", batch_size: int = 32,
                      heatmap: str = "relu", level_choice: str = "relevance",
                      keep_heatmaps: bool = False, progress=None,
                      shard: tuple[int, int] = (0, 1)) -> PointingResult:
    """Point every scorable phrase of ``manifest`` with ``heads``; skips counted by reason.

    ``level_choice``: how each word's (or query's) level is chosen (``scores.choose_levels``).
    ``progress(done, total)`` is called with the sequences grounded so far after each batch.
    ``shard=(k, n)`` grounds only batches k, k+n, k+2n, ... (the batches one process of n
    takes): the n shards' outcomes together are the whole evaluation's, phrase for phrase, since
    the batches are the same; skips are counted in shard 0 only.
    """
    if mode not in MODES:
        raise UnknownNameError("mode", mode, MODES)
    index, shards = shard
    if not 0 <= index < shards:
        raise ValueError(f"shard {index} of {shards}")
    visual, words = VisualBatchReader(images), TextBatchReader(text)
    check_same_manifest(manifest, visual.store, words.store)
    records = list(read_manifest(manifest))
    sizes = visual.store.original_sizes()
    status = visual.store.status()
    spans = words.store.phrase_spans()
    alone = spans["alone"]
    captions = words.store.captions()
    _check_sizes(manifest, records, sizes, status)
    names = visual.store.config.level_names
    result = PointingResult(level_names=[names[k] for k in heads.config.used_levels])
    by_sequence: dict[int, list[int]] = collections.defaultdict(list)
    items = []
    for k in range(len(spans["record"])):
        row = int(spans["record"][k])
        width, height = (int(v) for v in sizes[row])
        items.append(PhraseHeatmap(row, records[row].phrases[spans["index"][k]], width, height, None,
                                   skip=None if status[row] == OK else "image failed"))
    needed, shared = _entity_phrases(items)
    scored = set()
    for k, item in enumerate(items):
        phrase = item.phrase
        reason = item.skip or skip_reason(phrase, item.width, item.height)
        if reason:
            if index == 0:
                result.skipped[reason] += 1
            if k not in needed:
                continue
        else:
            scored.add(k)
        if mode == "query" and phrase.caption is not None:
            if alone is None or alone[k] < 0:
                raise CacheMismatchError(
                    f"{text}: phrase {k} ({' '.join(phrase.words)!r}) was encoded only inside its "
                    f"caption; --mode query needs every phrase encoded alone: run `multigrounding "
                    f"extract text --phrases-alone` into a new cache")
            by_sequence[int(alone[k])].append(k)
        else:
            by_sequence[int(spans["caption"][k])].append(k)
    grounded: dict[int, tuple] = {}
    caption_rows = set(captions.usable(status == OK).tolist())
    sequences = sorted(caption_rows | set(by_sequence))
    heads.eval()
    for first in range(index * batch_size, len(sequences), shards * batch_size):
        tick = time.perf_counter()
        rows = np.array(sequences[first:first + batch_size])
        tokens, mask, sentence = words.read(rows)
        # an image's sequences are consecutive (Visual Genome: dozens of queries an image):
        # each image of the batch is read and mapped once
        images, which = np.unique(captions.image[rows], return_inverse=True)
        levels = visual.read(images)
        tock = time.perf_counter()
        v = map_images(heads, levels, device)[torch.from_numpy(which.reshape(-1)).to(device)]
        s, sbar = map_text(heads, tokens, sentence, device)
        wg = word_grounding(s, torch.from_numpy(mask).to(device), v, heatmap=heatmap,
                            choice=level_choice)
        sg = sentence_grounding(sbar, v, heatmap=heatmap, choice=level_choice)
        grid = grid_of(v)
        for b, row in enumerate(rows.tolist()):
            if row in caption_rows:
                result.sentence_levels[int(sg["level"][b])] += 1
            for k in by_sequence.get(row, ()):
                record = int(spans["record"][k])
                phrase = records[record].phrases[spans["index"][k]]
                width, height = (int(x) for x in sizes[record])
                if phrase.caption is not None and mode == "sentence":
                    start = int(spans["start"][k])
                    heat, level = phrase_heatmap(wg, b, list(range(start, start + int(spans["length"][k]))), grid)
                else:
                    heat, level = sentence_heatmap(sg, b, grid)
                xy, correctness = point_and_correctness(heat, phrase.boxes, width, height)
                keep = heat is not None and (k in shared or keep_heatmaps)
                kept = heat.numpy().astype(np.float16) if keep else None
                grounded[k] = (kept if k in shared else None, xy)
                if k not in scored:
                    continue
                result.outcomes.append(PhraseOutcome(
                    record, int(spans["index"][k]), phrase.category or "(none)",
                    is_hit(xy, phrase.boxes), correctness,
                    level, xy, center_hit(phrase.boxes, width, height),
                    random_hit_rate(phrase.boxes, width, height),
                    kept if keep_heatmaps else None))
        result.read_seconds += tock - tick
        result.compute_seconds += time.perf_counter() - tock
        if progress is not None:
            progress(first + len(rows), len(sequences))
    result.phrases = [dataclasses.replace(item, heatmap=grounded[k][0], xy=grounded[k][1])
                      if k in grounded else item for k, item in enumerate(items)]
    return result


def _entity_phrases(items: list[PhraseHeatmap]) -> tuple[set[int], set[int]]:
    """The phrases of the entities WWbL's protocol scores (grounded even where the paper skips
    them), and among them those of entities with several mentions, whose heatmaps are kept for
    the entity's mean (a lone phrase is scored by its own point)."""
    scored = [unit.members for unit in units(items, "wwbl") if not unit.skipped]
    return ({k for members in scored for k in members},
            {k for members in scored if len(members) > 1 for k in members})


def _check_sizes(manifest, records, sizes, status) -> None:
    """Boxes are in the manifest's pixels and heatmaps are resized to the file's: they must agree."""
    for row, record in enumerate(records):
        if status[row] != OK or record.width is None or record.height is None:
            continue
        width, height = (int(v) for v in sizes[row])
        if (record.width, record.height) != (width, height):
            raise DatasetError(f"{manifest}: image {record.id}: the manifest says {record.width}x"
                               f"{record.height} but {record.image} is {width}x{height}; fix the "
                               f"manifest (`multigrounding datasets validate` finds every such record)")


def check_same_manifest(manifest, image_store, text_store) -> None:
    """Refuse stores made from another manifest, naming ids the stores lack when there are some."""
    sha = file_sha256(manifest)
    for store in (image_store, text_store):
        if store.config.manifest_sha256 == sha:
            continue
        known = set(str(i) for i in image_store.ids)
        absent = [record.id for record in read_manifest(manifest) if record.id not in known]
        if absent:
            shown = ", ".join(absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise CacheMismatchError(f"{manifest}: {len(absent)} image ids are not in {image_store.path} "
                                     f"({shown}): extract features for this manifest first")
        raise CacheMismatchError(f"{store.path} was not made from {manifest} (its manifest "
                                 "sha256 differs): evaluate with the stores of that manifest")


def pointing_validator(val_images, val_text, val_manifest, *, batch_size: int = 32,
                       heatmap: str = "relu", level_choice: str = "relevance"):
    """``validate(heads) -> accuracy``: the pointing game on a validation set, for ``train``.

    In a multi-process run every process grounds its shard of the batches and the hits and
    phrases are summed over the processes (one all-reduce), so each gets the accuracy one
    process would, sooner. (Rather than rank 0 alone while the others wait at a barrier: that
    wait would last the whole validation, so the collective timeout would have to exceed it, and
    the other processes would idle.)"""
    def validate(heads) -> float:
        device = next(heads.parameters()).device
        result = evaluate_pointing(heads, val_images, val_text, val_manifest, device=str(device),
                                   batch_size=batch_size, heatmap=heatmap,
                                   level_choice=level_choice, shard=world())
        hits, phrases = all_sum([result.hits, len(result.outcomes)], device)
        return hits / phrases if phrases else 0.0
    return validate
