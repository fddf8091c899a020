"""Scoring every test phrase once with trained heads, from the feature stores and the manifest.

Flickr30k-style phrases (with ``caption`` and ``start``) take the weighted word heatmaps of their
words inside the encoded caption; standalone queries (ReferIt, Visual Genome) take the sentence
heatmap of their own sequence at its best level. Each sequence is grounded once for all its
phrases.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from multigrounding.cache.reader import TextBatchReader, VisualBatchReader
from multigrounding.cache.store import CacheMismatchError
from multigrounding.cache.fingerprint import file_sha256
from multigrounding.datasets.manifest import read_manifest
from multigrounding.evaluation.pointing import attention_correctness, is_hit, phrase_map, point, skip_reason
from multigrounding.heads.scores import sentence_grounding, word_grounding


@dataclass
class PhraseOutcome:
    record: int
    index: int
    category: str
    hit: bool
    correctness: float
    level: int
    xy: tuple[int, int] | None


@dataclass
class PointingResult:
    outcomes: list[PhraseOutcome] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)

    @property
    def hits(self) -> int:
        return sum(o.hit for o in self.outcomes)

    @property
    def accuracy(self) -> float:
        return self.hits / len(self.outcomes) if self.outcomes else 0.0

    def summary(self) -> dict:
        per_category = collections.defaultdict(list)
        for outcome in self.outcomes:
            per_category[outcome.category].append(outcome.hit)
        return {"accuracy": self.accuracy, "hits": self.hits,
                "misses": len(self.outcomes) - self.hits, "skipped": dict(self.skipped),
                "attention_correctness": float(np.mean([o.correctness for o in self.outcomes]))
                if self.outcomes else 0.0,
                "per_category": {k: float(np.mean(v)) for k, v in sorted(per_category.items())}}


@torch.no_grad()
def evaluate_pointing(heads, images: str | Path, text: str | Path, manifest: str | Path, *,
                      device: str = "cpu", batch_size: int = 32, heatmap: str = "relu") -> PointingResult:
    """Point every scorable phrase of ``manifest`` with ``heads``; skips counted by reason."""
    visual, words = VisualBatchReader(images), TextBatchReader(text)
    _check_same_manifest(manifest, visual.store, words.store)
    records = list(read_manifest(manifest))
    sizes = visual.store.original_sizes()
    status = visual.store.status()
    group = words.store.group
    spans = {name: group[f"phrases/{name}"][:] for name in ("record", "index", "caption", "start", "length")}
    caption_image = group["captions/image"][:]
    result = PointingResult()
    by_sequence: dict[int, list[int]] = collections.defaultdict(list)
    for k in range(len(spans["record"])):
        record = records[spans["record"][k]]
        phrase = record.phrases[spans["index"][k]]
        width, height = (int(v) for v in sizes[spans["record"][k]])
        reason = skip_reason(phrase, width, height) if status[spans["record"][k]] == 1 else "image failed"
        if reason:
            result.skipped[reason] += 1
        else:
            by_sequence[int(spans["caption"][k])].append(k)
    sequences = sorted(by_sequence)
    heads.eval()
    for first in range(0, len(sequences), batch_size):
        rows = np.array(sequences[first:first + batch_size])
        image_rows = caption_image[rows]
        tokens, mask, sentence = words.read(rows)
        levels = visual.read(image_rows)
        v = heads.map_visual([torch.from_numpy(level).to(device).float() for level in levels])
        s = heads.map_words(torch.from_numpy(tokens).to(device).float())
        m = torch.from_numpy(mask).to(device)
        sbar = heads.map_sentence(torch.from_numpy(sentence).to(device).float())
        wg = word_grounding(s, m, v, heatmap=heatmap)
        sg = sentence_grounding(sbar, v, heatmap=heatmap)
        grid = int(round(v.shape[1] ** 0.5))
        for b, row in enumerate(rows):
            for k in by_sequence[int(row)]:
                record = records[spans["record"][k]]
                phrase = record.phrases[spans["index"][k]]
                width, height = (int(x) for x in sizes[spans["record"][k]])
                if phrase.caption is not None:
                    positions = range(int(spans["start"][k]), int(spans["start"][k] + spans["length"][k]))
                    chosen = wg["level"][b, list(positions)]
                    maps = torch.stack([wg["heatmaps"][b, t, :, chosen[i]] for i, t in enumerate(positions)])
                    heat = phrase_map(maps.reshape(-1, grid, grid).cpu(), wg["score"][b, list(positions)].clamp(min=0).cpu())
                    level = int(torch.mode(chosen).values)
                else:
                    level = int(sg["level"][b])
                    heat = sg["heatmaps"][b, :, level].reshape(grid, grid).cpu()
                xy = point(heat, width, height)
                result.outcomes.append(PhraseOutcome(
                    int(spans["record"][k]), int(spans["index"][k]), phrase.category or "(none)",
                    is_hit(xy, phrase.boxes), attention_correctness(heat, phrase.boxes, width, height),
                    level, xy))
    return result


def _check_same_manifest(manifest, image_store, text_store) -> None:
    sha = file_sha256(manifest)
    for store in (image_store, text_store):
        if store.config["manifest"]["sha256"] != sha:
            raise CacheMismatchError(f"{store.path} was not made from {manifest} (its manifest "
                                     "sha256 differs): evaluate with the stores of that manifest")
