"""Two ways of counting the pointing game on the same heatmaps, so that our figures can be set
beside either family of published ones.

``paper`` (Akbari et al. 2019; METHOD.md, "Test-time heatmaps and metrics"): every phrase once.
A phrase of type notvisual, scene or nobox, or without a box, is skipped, and so is one whose
union box (the rectangle around all its boxes) covers less than 5 % of the image. Its heatmap is
resized bilinearly to the image, the argmax pixel is a hit when it lies inside ANY of the
phrase's boxes, borders included.

``wwbl`` (Shaharabany & Wolf, "What is where by looking", NeurIPS 2022, as their evaluation code
counts: ``inference_grounding.py`` ``inference_bbox``, ``datasets/flicker.py`` ``get_test_data``,
``utils_grounding.py`` ``calc_correctness`` / ``isCorrectHit`` / ``union``, in
github.com/talshaharabany/what-is-where-by-looking): every ENTITY of an image once. An entity is
a Flickr30k coreference chain that has boxes; its phrases are all the mentions of that chain in
the image's captions. The entity's heatmap is the plain mean of its phrases' heatmaps; the argmax
of that mean, resized to the image, is a hit when it lies inside the UNION BOX of the chain's
boxes (min x0, min y0, max x1, max y1; borders included). The entity is skipped unless its FIRST
box (in the annotation file's order) covers MORE than 5 % of the image, its area taken as
(x1 - x0)(y1 - y0) on the 0-based corners. A standalone query (ReferIt, Visual Genome: no
caption) is its own entity, scored once against its box, with the same size rule.

Where WWbL's code leaves no trace in ours: each of its phrases is encoded alone ("image of " +
the phrase, lower-cased), so its Flickr30k heatmaps are those of ``evaluate --mode query``; the
protocol here only counts, whatever heatmaps it is given. Entities come from ``Phrase.chain``
(written by the Flickr30k reader); a manifest without chains groups a record's in-caption
phrases whose box lists are identical, which is the same thing except where two chains share
exactly the same boxes. A phrase without a heatmap (every weight zero) adds a zero map to its
entity's mean; an entity whose mean is zero everywhere is a miss, as a phrase is under ``paper``.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import numpy as np
import torch

from multigrounding.datasets.records import Phrase
from multigrounding.errors import UnknownNameError
from multigrounding.evaluation.heatmap_metrics import (MIN_UNION_FRACTION, center_hit, is_hit, point,
                                                random_hit_rate, skip_reason)

PROTOCOLS = ("paper", "wwbl")
# how reports name each protocol
PROTOCOL_TITLES = {"paper": "per phrase, any box, the paper's",
                   "wwbl": "per entity, union box, WWbL NeurIPS 2022"}


@dataclass(frozen=True)
class PhraseHeatmap:
    """One test phrase as grounded: its image (``record``, the manifest row, and size), the
    phrase itself (boxes, type, caption, chain) and its heatmap [M, M] (None: zero everywhere).

    ``xy``, when given, is the pixel the phrase's own heatmap points at: a unit of this phrase
    alone is scored with it, so a caller need keep the heatmaps only of entities with several
    mentions. ``skip``, when given, is a reason to skip the phrase that only the caller knows
    (its image could not be read); it overrides the protocol's own."""

    record: int
    phrase: Phrase
    width: int
    height: int
    heatmap: np.ndarray | torch.Tensor | None
    xy: tuple[int, int] | None = None
    skip: str | None = None


@dataclass
class Unit:
    """What a protocol scores once: a phrase (``paper``) or an entity (``wwbl``), its members
    (indices into the given phrases), the boxes a point must fall in, and why it is skipped."""

    key: Hashable
    members: list[int]
    boxes: list[list[float]]
    category: str
    skipped: str | None = None


@dataclass
class ProtocolCounts:
    """The pointing game under one protocol: units scored, hits, skips by reason, baselines."""

    protocol: str
    unit: str                       # "phrase" or "entity"
    hits: int = 0
    misses: int = 0
    phrases: int = 0                # phrases inside the scored units
    skipped: collections.Counter = field(default_factory=collections.Counter)
    center_hits: int = 0
    random_hits: float = 0.0        # expected hits of a uniformly random pixel
    per_category: dict[str, list[int]] = field(default_factory=dict)  # name: [scored, hits]

    @property
    def scored(self) -> int:
        return self.hits + self.misses

    @property
    def accuracy(self) -> float:
        return self.hits / self.scored if self.scored else 0.0

    def summary(self) -> dict:
        """What metrics.json / results.md report for this protocol."""
        scored = self.scored
        return {"protocol": self.protocol, "unit": self.unit, "accuracy": self.accuracy,
                "scored": scored, "hits": self.hits, "misses": self.misses,
                "phrases": self.phrases, "skipped": sum(self.skipped.values()),
                "skipped_by_reason": dict(self.skipped),
                "center_baseline": self.center_hits / scored if scored else 0.0,
                "random_baseline": self.random_hits / scored if scored else 0.0,
                "per_category": {name: {"scored": n, "hits": h, "accuracy": h / n if n else 0.0}
                                 for name, (n, h) in sorted(self.per_category.items())}}


def plural(unit: str) -> str:
    """"phrases", "entities": how reports name several units."""
    return "entities" if unit == "entity" else f"{unit}s"


def units(phrases: Sequence[PhraseHeatmap], protocol: str) -> list[Unit]:
    """The units ``protocol`` scores, in the order of their first phrase, with skip reasons."""
    if protocol == "paper":
        return [Unit(k, [k], p.phrase.boxes, p.phrase.category or "(none)",
                     p.skip or skip_reason(p.phrase, p.width, p.height))
                for k, p in enumerate(phrases)]
    if protocol == "wwbl":
        groups: dict[Hashable, list[int]] = {}
        for k, p in enumerate(phrases):
            groups.setdefault(entity_key(p), []).append(k)
        return [_entity(key, members, phrases) for key, members in groups.items()]
    raise UnknownNameError("protocol", protocol, PROTOCOLS)


def entity_key(item: PhraseHeatmap) -> Hashable:
    """Which entity a phrase mentions: its record and chain; without a chain, its record and its
    boxes when it sits in a caption, or the phrase itself when it is a standalone query."""
    phrase = item.phrase
    if phrase.chain is not None:
        return item.record, "chain", phrase.chain
    if phrase.caption is not None and phrase.boxes:
        return item.record, "boxes", tuple(tuple(box) for box in phrase.boxes)
    return item.record, "phrase", id(item)


def _entity(key: Hashable, members: list[int], phrases: Sequence[PhraseHeatmap]) -> Unit:
    first = phrases[members[0]]
    boxes: list[list[float]] = []
    for k in members:  # the chain's boxes, each once, in the order they first appear
        for box in phrases[k].phrase.boxes:
            if list(box) not in boxes:
                boxes.append(list(box))
    union = [[min(b[0] for b in boxes), min(b[1] for b in boxes),
              max(b[2] for b in boxes), max(b[3] for b in boxes)]] if boxes else []
    return Unit(key, members, union, first.phrase.category or "(none)",
                _entity_skip(first, boxes))


def _entity_skip(first: PhraseHeatmap, boxes: list[list[float]]) -> str | None:
    """WWbL's rule: no box (not visual, the whole scene, no box drawn), or a first box of at
    most 5 % of the image."""
    if first.skip:
        return first.skip
    if not boxes:
        reason = skip_reason(first.phrase, first.width, first.height)
        return reason or "no box"
    x0, y0, x1, y1 = boxes[0]
    if not (x1 - x0) * (y1 - y0) > MIN_UNION_FRACTION * first.width * first.height:
        return "small"
    return None


def count(phrases: Sequence[PhraseHeatmap], protocol: str) -> ProtocolCounts:
    """Score ``phrases`` (every test phrase of a set, with its heatmap) under ``protocol``."""
    result = ProtocolCounts(protocol, "phrase" if protocol == "paper" else "entity")
    for unit in units(phrases, protocol):
        if unit.skipped:
            result.skipped[unit.skipped] += 1
            continue
        first = phrases[unit.members[0]]
        width, height = first.width, first.height
        hit = is_hit(_unit_point(phrases, unit.members, width, height), unit.boxes)
        result.hits += hit
        result.misses += not hit
        result.phrases += len(unit.members)
        result.center_hits += center_hit(unit.boxes, width, height)
        result.random_hits += random_hit_rate(unit.boxes, width, height)
        scored_hits = result.per_category.setdefault(unit.category, [0, 0])
        scored_hits[0] += 1
        scored_hits[1] += hit
    return result


def _unit_point(phrases: Sequence[PhraseHeatmap], members: list[int], width: int,
                height: int) -> tuple[int, int] | None:
    """Where a unit points: a lone phrase's own point when the caller gave it, else the argmax
    of the members' mean heatmap."""
    if len(members) == 1 and phrases[members[0]].xy is not None:
        return phrases[members[0]].xy
    return point(_mean_heatmap(phrases, members), width, height)


def _mean_heatmap(phrases: Sequence[PhraseHeatmap], members: list[int]) -> torch.Tensor | None:
    """The plain mean of the members' [M, M] maps (a missing map counts as zeros). Bilinear
    resizing is linear, so the mean of the small maps points where the mean of the resized
    ones does."""
    maps = [phrases[k].heatmap for k in members]
    present = [torch.as_tensor(np.asarray(m, dtype=np.float32)) if isinstance(m, np.ndarray)
               else m.float() for m in maps if m is not None]
    if not present:
        return None
    if len({tuple(m.shape) for m in present}) > 1:
        raise ValueError(f"the heatmaps of one entity differ in size: {[tuple(m.shape) for m in present]}")
    return torch.stack(present).sum(0) / len(maps)
