"""``ground``: one image and one sentence through a trained run, no cache needed.

The frozen backbone and text encoder named in the run's checkpoint are built on the fly, with the
same weights (their sha256 is checked against what the run was trained on) and the same input
preparation as extraction, so the heatmaps are the ones evaluation would compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from multigrounding.cache.image_store import ImageStoreConfig
from multigrounding.cache.text_store import TextStoreConfig
from multigrounding.datasets.images import ImageProblem, inspect_image, load_rgb
from multigrounding.devices import resolve_device
from multigrounding.errors import MultigroundingError
from multigrounding.evaluation.heatmap_metrics import point
from multigrounding.heads.checkpoint import Checkpoint, load_heads
from multigrounding.heads.level_selection import level_choice as run_level_choice
from multigrounding.heads.inference import (grid_of, map_images, map_text, phrase_heatmap,
                                            sentence_heatmap)
from multigrounding.heads.scores import sentence_grounding, word_grounding
from multigrounding.pipeline.backbones import create_backbone_from
from multigrounding.pipeline.text_encoders import create_text_encoder


class GroundInputError(MultigroundingError, ValueError):
    """The sentence or a phrase given to ``ground`` cannot be grounded."""


@dataclass
class GroundedText:
    text: str
    kind: str                        # "sentence", "phrase" or "word"
    heatmap: torch.Tensor | None     # [M, M]; None when no cell is positive
    xy: tuple[int, int] | None       # the pointed pixel in the original image
    level: int
    level_name: str
    score: float                     # the relevance R at the chosen level (a phrase: its best word's)


@dataclass
class Grounding:
    image: Path
    width: int
    height: int
    items: list[GroundedText]


def find_phrase(words: list[str], phrase: str) -> list[int]:
    """The word positions of ``phrase`` inside ``words`` (its first occurrence, whole words)."""
    target = phrase.split()
    if not target:
        raise GroundInputError("a --phrase is empty")
    for start in range(len(words) - len(target) + 1):
        if words[start:start + len(target)] == target:
            return list(range(start, start + len(target)))
    raise GroundInputError(f"phrase {phrase!r} is not in the sentence {' '.join(words)!r} (whole "
                           f"words, as written)")


def build_models(saved: Checkpoint, device: str, elmo_options=None, elmo_weights=None):
    """The run's backbone and text encoder, with the weights it was trained on."""
    if not saved.image_config or not saved.text_config:
        raise MultigroundingError(f"{saved.path}: this checkpoint does not record its models "
                                  "(made by an older version); train the run again to ground with it")
    image_config = ImageStoreConfig.from_json(saved.image_config)
    text_config = TextStoreConfig.from_json(saved.text_config)
    backbone = create_backbone_from(image_config, device=device)
    files = text_config.encoder_files or {}
    encoder = create_text_encoder(text_config.encoder["name"],
                                  elmo_options=elmo_options or files.get("elmo_options"),
                                  elmo_weights=elmo_weights or files.get("elmo_weights"),
                                  device=device, max_words=text_config.max_words)
    trained = {k: v for k, v in text_config.encoder.items() if k.endswith("sha256")}
    now = {k: v for k, v in encoder.config().items() if k.endswith("sha256")}
    if trained != now:
        raise MultigroundingError(f"text encoder {text_config.encoder['name']}: its files differ "
                                  f"from the ones the run was trained on ({trained} vs {now})")
    return backbone, encoder, image_config


@torch.no_grad()
def ground_image(run: str | Path, image: str | Path, sentence: str, phrases: list[str] | None = None,
                 *, checkpoint: str = "best", device: str = "auto", elmo_options=None,
                 elmo_weights=None, level_choice: str | None = None) -> Grounding:
    """Ground ``phrases`` (word spans of ``sentence``), or else the sentence and each word;
    ``level_choice`` (``scores.choose_levels``; None: the run's) picks each word's level."""
    words = sentence.split()
    if not words:
        raise GroundInputError("the sentence is empty")
    spans = [(text, "phrase", find_phrase(words, text)) for text in phrases or ()]
    try:
        inspect_image(image)          # a bad file is refused before any model is built
    except ImageProblem as problem:
        raise GroundInputError(f"{image}: {problem}") from None
    device = resolve_device(device)
    heads, saved = load_heads(run, checkpoint, device)
    backbone, encoder, image_config = build_models(saved, device, elmo_options, elmo_weights)
    try:
        pixels, (width, height) = load_rgb(image, backbone.spec.input_size)
    except ImageProblem as problem:
        raise GroundInputError(f"{image}: {problem}") from None
    levels = backbone.forward(torch.from_numpy(np.array(pixels))[None])
    encoded = encoder.encode([words])[0]
    v = map_images(heads, levels, device)
    s, sbar = map_text(heads, encoded.tokens[None], encoded.sentence[None], device)
    heatmap = saved.config["heatmap"]
    choice = level_choice or run_level_choice(saved.config.get("level_selection"))
    wg = word_grounding(s, None, v, heatmap=heatmap, choice=choice)
    grid = grid_of(v)
    names = [image_config.level_names[k] for k in heads.config.used_levels]
    items = []
    if not phrases:
        sg = sentence_grounding(sbar, v, heatmap=heatmap, choice=choice)
        heat, level = sentence_heatmap(sg, 0, grid)
        items.append(_item(sentence, "sentence", heat, level, float(sg["score"][0]), names, width, height))
        spans = [(word, "word", [t]) for t, word in enumerate(words)]
    for text, kind, positions in spans:
        heat, level = phrase_heatmap(wg, 0, positions, grid)
        score = float(wg["score"][0, positions].max())
        items.append(_item(text, kind, heat, level, score, names, width, height))
    return Grounding(Path(image), width, height, items)


def _item(text, kind, heat, level, score, names, width, height) -> GroundedText:
    if heat is not None and not bool((heat > 0).any()):
        heat = None
    return GroundedText(text, kind, heat, point(heat, width, height), level, names[level], score)
