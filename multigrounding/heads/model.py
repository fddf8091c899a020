"""The mappings into the common space (METHOD.md "Mappings") — the only trainable parameters.

- Visual, per used level: 1×1 convolutions with bias, each followed by LeakyReLU(0.25), the last
  with D outputs, then L2-normalisation over channels. The cache stores maps channels-last
  ``[B, M, M, C_k]``, so a 1×1 convolution is an ``nn.Linear`` over the last axis (the same
  maths and the same parameter count; a conv kernel ``[out, in, 1, 1]`` is its weight
  ``[out, in]``).
- Words: a learned mix of the encoder's layers as ELMo's ScalarMix (``gamma * sum_k
  softmax(w)_k x_k``, w = 0 and gamma = 1 at start), then FC(D) → LeakyReLU → FC(D) → LeakyReLU
  → L2, shared over words.
- Sentence: a learned weighting of the cached sentence vectors (``Linear(S, 1, bias=False)``),
  then its own FC(D) → LeakyReLU → FC(D) → LeakyReLU → L2.

Ablations (``HeadsConfig``): ``levels`` picks the cached levels used (``[3]``: one fixed level,
L = 1); ``linear_visual`` makes each level's mapping one linear 1×1 conv (no activation);
``linear_text`` makes the word and sentence mappings one linear FC each (the mixes stay). Only
the modules of used levels exist, so every parameter is trained.

Initialisation follows the reference implementation's framework defaults (TensorFlow's dense and
conv2d layers): Glorot-uniform weights and zero biases, for the sentence weighting too.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multigrounding.errors import MultigroundingError
from multigrounding.heads.scores import HeadsInputError, compute_dtype, l2_normalize


class HeadsConfigError(MultigroundingError, ValueError):
    """A HeadsConfig field is out of range or inconsistent with another."""


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_int(name: str, value) -> int:
    if not _is_int(value) or value < 1:
        raise HeadsConfigError(f"HeadsConfig.{name} must be a positive integer; got {value!r}")
    return int(value)


def _int_list(name: str, value, what: str) -> list[int]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise HeadsConfigError(f"HeadsConfig.{name} must be a list of {what}; got {value!r}")
    value = list(value)
    if not value:
        raise HeadsConfigError(f"HeadsConfig.{name} must not be empty")
    for item in value:
        if not _is_int(item):
            raise HeadsConfigError(f"HeadsConfig.{name} must be a list of {what}; got {value!r}")
    return [int(item) for item in value]


@dataclass
class HeadsConfig:
    """Everything that shapes ``GroundingHeads``; checkpoints store it (``dataclasses.asdict``)."""

    visual_channels: list[int]          # C_k of each cached level (e.g. [40, 112, 320, 1280])
    text_layers: int                    # cached layers per word (ELMo 3, MiniLM 7)
    text_dim: int                       # cached word width (ELMo 1024, MiniLM 384)
    sentence_vectors: int               # cached sentence vectors per caption (ELMo 2, MiniLM 14)
    dim: int = 1024                     # D, the common space
    visual_widths: list[int] | None = None   # the 1x1 convs' widths; default [dim]*3; last = dim
    levels: list[int] | None = None     # cached levels used (None: all; [3]: one fixed level)
    linear_visual: bool = False         # ablation: one linear 1x1 conv per level
    linear_text: bool = False           # ablation: one linear FC for words and for the sentence
    leaky_slope: float = 0.25

    def __post_init__(self):
        self.visual_channels = _int_list("visual_channels", self.visual_channels,
                                         "positive channel counts")
        for k, channels in enumerate(self.visual_channels):
            if channels < 1:
                raise HeadsConfigError(f"HeadsConfig.visual_channels[{k}] = {channels}; channel "
                                       f"counts must be positive")
        for name in ("text_layers", "text_dim", "sentence_vectors", "dim"):
            setattr(self, name, _positive_int(name, getattr(self, name)))
        if self.visual_widths is not None:
            widths = _int_list("visual_widths", self.visual_widths, "positive widths")
            if min(widths) < 1:
                raise HeadsConfigError(f"HeadsConfig.visual_widths must be positive; got {widths}")
            if widths[-1] != self.dim:
                raise HeadsConfigError(
                    f"HeadsConfig.visual_widths ends with {widths[-1]} but dim is {self.dim}: the "
                    f"last 1x1 conv outputs the common space, so its width must equal dim (e.g. "
                    f"visual_widths=[2048, 2048, {self.dim}], or leave it None for "
                    f"[{self.dim}, {self.dim}, {self.dim}])")
            if self.linear_visual and len(widths) != 1:
                raise HeadsConfigError(
                    f"HeadsConfig.linear_visual maps each level with one linear 1x1 conv of width "
                    f"dim={self.dim}; visual_widths={widths} describes {len(widths)} convs. Leave "
                    f"visual_widths None (or [{self.dim}]) with linear_visual")
            self.visual_widths = widths
        if self.levels is not None:
            levels = _int_list("levels", self.levels, "level indices")
            count = len(self.visual_channels)
            bad = [k for k in levels if not 0 <= k < count]
            if bad:
                raise HeadsConfigError(f"HeadsConfig.levels {bad} out of range: the cache has "
                                       f"{count} levels, numbered 0..{count - 1}")
            if len(set(levels)) != len(levels):
                raise HeadsConfigError(f"HeadsConfig.levels {levels} names a level twice")
            self.levels = levels
        self.linear_visual, self.linear_text = bool(self.linear_visual), bool(self.linear_text)
        self.leaky_slope = float(self.leaky_slope)

    @property
    def used_levels(self) -> list[int]:
        """Indices of the cached levels the heads map, in output order (v's axis L)."""
        return list(range(len(self.visual_channels))) if self.levels is None else list(self.levels)

    @property
    def conv_widths(self) -> list[int]:
        """Output widths of one level's 1x1 convs."""
        if self.linear_visual:
            return [self.dim]
        return list(self.visual_widths) if self.visual_widths is not None else [self.dim] * 3


class ScalarMix(nn.Module):
    """ELMo's scalar mix: ``gamma * sum_k softmax(w)_k x[..., k, :]`` over the layer axis -2."""

    def __init__(self, layers: int):
        super().__init__()
        self.weights = nn.Parameter(torch.zeros(layers))
        self.gamma = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        mix = torch.softmax(self.weights, dim=0).to(x.dtype)
        return self.gamma.to(x.dtype) * torch.einsum("...kd,k->...d", x, mix)


def _mlp(widths: list[int], slope: float, activate: bool) -> nn.Sequential:
    """Linear layers ``widths[0] → widths[1] → ...``, each followed by LeakyReLU if ``activate``."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(fan_in, fan_out))
        if activate:
            layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


class GroundingHeads(nn.Module):
    """Visual, word and sentence mappings into one L2-normalised common space of width D."""

    def __init__(self, config: HeadsConfig):
        super().__init__()
        if not isinstance(config, HeadsConfig):
            raise HeadsConfigError(f"GroundingHeads needs a HeadsConfig; got "
                                   f"{type(config).__name__}")
        self.config = config
        c = config
        self.visual = nn.ModuleDict({
            f"level{k}": _mlp([c.visual_channels[k]] + c.conv_widths, c.leaky_slope,
                              not c.linear_visual)
            for k in c.used_levels})
        text_widths = [c.text_dim, c.dim] if c.linear_text else [c.text_dim, c.dim, c.dim]
        self.word_mix = ScalarMix(c.text_layers)
        self.word = _mlp(text_widths, c.leaky_slope, not c.linear_text)
        self.sentence_mix = nn.Linear(c.sentence_vectors, 1, bias=False)
        self.sentence = _mlp(text_widths, c.leaky_slope, not c.linear_text)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weights, zero biases; the scalar mix at equal weights and gamma 1."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.zeros_(self.word_mix.weights)
        nn.init.ones_(self.word_mix.gamma)

    @property
    def num_levels(self) -> int:
        return len(self.visual)

    def _dtype(self) -> torch.dtype:
        return self.sentence_mix.weight.dtype

    # ------------------------------------------------------------------------------- visual
    def map_visual(self, levels: list[Tensor]) -> Tensor:
        """Cached maps ``[B, M, M, C_k]`` (any float dtype) → ``v [B, N, L, D]``, L2-normalised.

        ``levels`` holds every cached level (the used ones are picked by ``config.levels``) or
        exactly the used ones, in ``config.levels`` order. ``N = M*M`` row-major: ``n = y*M + x``.
        """
        c = self.config
        levels = list(levels)
        if len(levels) == len(c.visual_channels):
            chosen = [(k, levels[k]) for k in c.used_levels]
        elif len(levels) == len(c.used_levels):
            chosen = list(zip(c.used_levels, levels))
        else:
            raise HeadsInputError(
                f"map_visual got {len(levels)} level maps; expected the {len(c.visual_channels)} "
                f"cached levels or the {len(c.used_levels)} used ones ({c.used_levels})")
        mapped, grid = [], None
        for k, x in chosen:
            if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != c.visual_channels[k]:
                got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise HeadsInputError(
                    f"cached level {k} must be [B, M, M, {c.visual_channels[k]}] (channels last, "
                    f"C_{k} = {c.visual_channels[k]} per HeadsConfig.visual_channels); got {got}")
            if grid is None:
                grid = tuple(x.shape[:3])
            elif tuple(x.shape[:3]) != grid:
                raise HeadsInputError(f"cached level {k} is {list(x.shape[:3])} [B, M, M] but "
                                      f"level {chosen[0][0]} is {list(grid)}; levels must share "
                                      f"batch and grid")
            mapped.append(self.visual[f"level{k}"](x.to(self._dtype())))
        batch, height, width = grid
        v = torch.stack(mapped, dim=3).reshape(batch, height * width, len(mapped), c.dim)
        return l2_normalize(v)

    # --------------------------------------------------------------------------------- text
    def map_words(self, tokens: Tensor) -> Tensor:
        """Cached word layers ``[B, T, text_layers, text_dim]`` → ``s [B, T, D]``, L2-normalised."""
        c = self.config
        if not isinstance(tokens, Tensor) or tokens.dim() != 4 or \
                tuple(tokens.shape[2:]) != (c.text_layers, c.text_dim):
            got = list(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise HeadsInputError(f"map_words expects tokens [B, T, {c.text_layers}, {c.text_dim}] "
                                  f"(text_layers, text_dim of HeadsConfig); got {got}. Was the "
                                  f"text cache made by another encoder?")
        return l2_normalize(self.word(self.word_mix(tokens.to(self._dtype()))))

    def map_sentence(self, sentence: Tensor) -> Tensor:
        """Cached sentence vectors ``[B, S, text_dim]`` → ``s̄ [B, D]``, L2-normalised."""
        c = self.config
        if not isinstance(sentence, Tensor) or sentence.dim() != 3 or \
                tuple(sentence.shape[1:]) != (c.sentence_vectors, c.text_dim):
            got = list(sentence.shape) if isinstance(sentence, Tensor) else type(sentence).__name__
            raise HeadsInputError(f"map_sentence expects [B, {c.sentence_vectors}, {c.text_dim}] "
                                  f"(sentence_vectors, text_dim of HeadsConfig); got {got}")
        weighted = self.sentence_mix(sentence.to(self._dtype()).transpose(1, 2)).squeeze(-1)
        return l2_normalize(self.sentence(weighted))

    def forward(self, levels: list[Tensor], tokens: Tensor, sentence: Tensor
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``(v, s, s̄)`` in one call (what DistributedDataParallel needs)."""
        return self.map_visual(levels), self.map_words(tokens), self.map_sentence(sentence)

    # -------------------------------------------------------------------------------- penalty
    def visual_kernels(self) -> list[Tensor]:
        """The visual 1x1 conv weights (no biases): what the L2 penalty covers."""
        return [m.weight for m in self.visual.modules() if isinstance(m, nn.Linear)]

    def l2_penalty(self) -> Tensor:
        """``½ Σ w²`` over the visual 1x1 conv kernels only (the loss multiplies by 5e-4)."""
        return 0.5 * sum((w.to(compute_dtype(w)) ** 2).sum() for w in self.visual_kernels())
