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

from multigrounding.datasets.images import load_rgb
from multigrounding.errors import MultigroundingError
from multigrounding.evaluation.grounding import phrase_from_words
from multigrounding.evaluation.pointing import point
from multigrounding.heads.scores import sentence_grounding, word_grounding
from multigrounding.heads.trainer import load_heads, resolve_device


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


def build_models(state: dict, device: str, elmo_options=None, elmo_weights=None):
    """The run's backbone and text encoder, with the weights it was trained on."""
    from multigrounding.pipeline.backbones import create_backbone
    from multigrounding.pipeline.text_encoders import create_text_encoder

    image_config, text_config = state.get("image_config"), state.get("text_config")
    if image_config is None or text_config is None:
        raise MultigroundingError(f"{state['path']}: this checkpoint does not record its models "
                                  "(made by an older version); train the run again to ground with it")
    weights = image_config["weights"]
    kind = weights["weights"]
    source = {"imagenet": weights.get("record") or "imagenet", "random": "random"}.get(kind, weights.get("source"))
    backbone = create_backbone(image_config["backbone"], source, seed=weights.get("seed") or 0,
                               device=device)
    if backbone.weights_info.get("sha256") != weights.get("sha256"):
        raise MultigroundingError(f"{image_config['backbone']} weights {source} have sha256 "
                                  f"{backbone.weights_info.get('sha256')}, not the {weights.get('sha256')} "
                                  f"the run was trained on")
    encoder_config = text_config["encoder"]
    files = text_config.get("encoder_files") or {}
    encoder = create_text_encoder(encoder_config["name"],
                                  elmo_options=elmo_options or files.get("elmo_options"),
                                  elmo_weights=elmo_weights or files.get("elmo_weights"),
                                  device=device, max_words=int(text_config.get("max_words", 64)))
    trained = {k: v for k, v in encoder_config.items() if k.endswith("sha256")}
    now = {k: v for k, v in encoder.config().items() if k.endswith("sha256")}
    if trained != now:
        raise MultigroundingError(f"text encoder {encoder_config['name']}: its files differ from the "
                                  f"ones the run was trained on ({trained} vs {now})")
    return backbone, encoder


@torch.no_grad()
def ground_image(run: str | Path, image: str | Path, sentence: str, phrases: list[str] | None = None,
                 *, checkpoint: str = "best", device: str = "auto", elmo_options=None,
                 elmo_weights=None) -> Grounding:
    """Ground ``phrases`` (word spans of ``sentence``), or else the sentence and each word."""
    words = sentence.split()
    if not words:
        raise GroundInputError("the sentence is empty")
    spans = [(text, "phrase", find_phrase(words, text)) for text in phrases or ()]
    device = str(resolve_device(device))
    heads, state = load_heads(run, checkpoint, device)
    backbone, encoder = build_models(state, device, elmo_options, elmo_weights)
    pixels, (width, height) = load_rgb(image, backbone.spec.input_size)
    levels = backbone.forward(torch.from_numpy(np.array(pixels))[None])
    encoded = encoder.encode([words])[0]
    v = heads.map_visual([level.to(device) for level in levels])
    s = heads.map_words(torch.from_numpy(encoded.tokens)[None].to(device))
    sbar = heads.map_sentence(torch.from_numpy(encoded.sentence)[None].to(device))
    heatmap = state["config"]["heatmap"]
    wg = word_grounding(s, None, v, heatmap=heatmap)
    grid = int(round(v.shape[1] ** 0.5))
    names = [lv["name"] for lv in state["image_config"]["levels"]]
    names = [names[k] for k in heads.config.used_levels]
    items = []
    if not phrases:
        sg = sentence_grounding(sbar, v, heatmap=heatmap)
        level = int(sg["level"][0])
        heat = sg["heatmaps"][0, :, level].reshape(grid, grid).cpu()
        items.append(_item(sentence, "sentence", heat, level, float(sg["score"][0]), names, width, height))
        spans = [(word, "word", [t]) for t, word in enumerate(words)]
    for text, kind, positions in spans:
        heat, level = phrase_from_words(wg, 0, positions, grid)
        score = float(wg["score"][0, positions].max())
        items.append(_item(text, kind, heat, level, score, names, width, height))
    return Grounding(Path(image), width, height, items)


def _item(text, kind, heat, level, score, names, width, height) -> GroundedText:
    if heat is not None and not bool((heat > 0).any()):
        heat = None
    return GroundedText(text, kind, heat, point(heat, width, height), level, names[level], score)
