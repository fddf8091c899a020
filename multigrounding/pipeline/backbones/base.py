"""What a backbone is: its records (levels, weights, normalisation, spec), the builder each
registered backbone supplies, and the frozen module with its taps."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from multigrounding.errors import MultigroundingError


# --- errors ------------------------------------------------------------------------------------

class WeightsUnavailableError(MultigroundingError, FileNotFoundError):
    """Weights that cannot be had here: offline and not cached, or a weights file that is missing."""


class WeightsMismatchError(MultigroundingError, ValueError):
    """A weights file that does not fit the network: unreadable, wrong keys or shapes, bad hash."""


class BackboneInputError(MultigroundingError, ValueError):
    """Images not in the form a backbone takes (uint8 RGB ``[B, S, S, 3]`` at its input size)."""


# --- the records -------------------------------------------------------------------------------

@dataclass(frozen=True)
class FeatureLevel:
    """One tapped feature map: ``module`` is the dotted path of the module whose output it is,
    inside ``Backbone.net``; ``stride`` is the nominal input pixels per output cell."""
    name: str
    module: str
    channels: int
    stride: int


@dataclass(frozen=True)
class Normalisation:
    """How images are prepared for some weights: for x, float RGB in [0, 255],
    the network input is ``(x * scale - mean) / std`` per channel."""
    description: str
    scale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_dict(self) -> dict:
        return {"description": self.description, "scale": self.scale,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class WeightsRecord:
    """Where some weights come from, their sha256 when known in advance, the normalisation that
    belongs to them, and caveats in words."""
    name: str
    source: str
    sha256: str | None
    normalisation: Normalisation
    notes: str


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone produces: its levels (in output order), the common grid M, the input size S
    and its weight records (``default_weights`` is what ``"imagenet"`` means)."""
    name: str
    levels: tuple[FeatureLevel, ...]
    grid: int
    input_size: int
    weights: dict[str, WeightsRecord]
    default_weights: str
    description: str

    def to_dict(self) -> dict:
        """The spec without its weight records, as JSON-able data."""
        return {"name": self.name, "grid": self.grid, "input_size": self.input_size,
                "levels": [dataclasses.asdict(level) for level in self.levels],
                "default_weights": self.default_weights}


class BackboneBuilder:
    """How to make one backbone: its :class:`BackboneSpec` (data), a network with randomly
    initialised parameters, and where its named weights come from.

    ``build()`` returns a module with ``forward_features(x)`` (normalised float NCHW input) that
    runs at least through every tapped module; if it also has a classifier, ``has_classifier``
    is true and calling it gives ImageNet logits. ``dropped_prefixes`` are state-dict key
    prefixes of parts the network leaves out (a classifier), ignored when loading a file.
    """
    spec: ClassVar[BackboneSpec]
    dropped_prefixes: ClassVar[tuple[str, ...]] = ()
    has_classifier: ClassVar[bool] = False

    def build(self) -> nn.Module:
        raise NotImplementedError

    def fetch(self, record: WeightsRecord) -> Path:
        """The local file of ``record`` (downloaded and cached if need be), or
        :class:`WeightsUnavailableError` saying which file to put where."""
        raise NotImplementedError


# --- the module --------------------------------------------------------------------------------

class _Tap:
    """A forward hook keeping (a copy of) one module's output, per thread — so that threads
    sharing one backbone (dask's threaded scheduler) do not see each other's maps. Picklable."""

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()

    def reset(self) -> None:
        self._local.value = None

    @property
    def value(self) -> torch.Tensor | None:
        return getattr(self._local, "value", None)

    def __call__(self, module, inputs, output):
        if self.value is not None:
            raise RuntimeError(f"tapped module {self.path!r} ran twice in one forward pass; a level "
                               f"must name a module used once")
        # a copy, so that a later in-place operation cannot change it
        self._local.value = output.clone()

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._local = threading.local()


class Backbone(nn.Module):
    """A frozen network with its taps. ``forward`` = ``to_grid(forward_taps(images))``."""

    def __init__(self, spec: BackboneSpec, net: nn.Module, weights_info: dict,
                 normalisation: Normalisation, *, has_classifier: bool = False):
        super().__init__()
        self.spec = spec
        self.weights_info = weights_info
        self.normalisation = normalisation
        self.has_classifier = has_classifier
        self.net = net
        self.register_buffer("_mean", torch.tensor(normalisation.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(normalisation.std).view(1, 3, 1, 1), persistent=False)
        self._taps = []
        for level in spec.levels:
            tap = _Tap(level.module)
            net.get_submodule(level.module).register_forward_hook(tap)
            self._taps.append(tap)
        net.requires_grad_(False)
        self.compute_dtype = torch.float32
        self.channels_last = False
        self.eval()

    def set_precision(self, dtype: torch.dtype = torch.float32, channels_last: bool = False) -> "Backbone":
        """Run the network in ``dtype`` (float32, bfloat16 or float16: 2-4x faster on GPUs with
        tensor cores), with NHWC activations if ``channels_last`` (what those kernels want).
        Inputs are normalised in float32 and the taps come back as float32 either way."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute dtype must be float32, bfloat16 or float16, not {dtype}")
        self.net.to(dtype=dtype)
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.compute_dtype, self.channels_last = dtype, channels_last
        return self

    def train(self, mode: bool = True) -> "Backbone":
        """Always eval: the backbone is frozen (batch-norm statistics and dropout included)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, weights={self.weights_info.get('weights')!r}"

    def prepare(self, images) -> torch.Tensor:
        """uint8 ``[B, S, S, 3]`` RGB (tensor or numpy array) → normalised ``[B, 3, S, S]`` in the
        compute dtype (float32 unless ``set_precision`` said otherwise)."""
        if not isinstance(images, torch.Tensor):
            try:
                images = torch.as_tensor(images)
            except Exception:  # noqa: BLE001
                raise BackboneInputError(f"images must be a uint8 tensor or array, "
                                         f"not {type(images).__name__}") from None
        size = self.spec.input_size
        if images.dtype != torch.uint8:
            raise BackboneInputError(f"{self.spec.name} takes uint8 RGB images, got {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
            raise BackboneInputError(
                f"{self.spec.name} takes images of shape [B, {size}, {size}, 3] (resized to its "
                f"input size {size}), got {list(images.shape)}")
        x = images.to(self.device).permute(0, 3, 1, 2).float()
        x = (x * self.normalisation.scale - self._mean) / self._std
        if self.compute_dtype != torch.float32:
            x = x.to(self.compute_dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def forward_taps(self, images) -> list[torch.Tensor]:
        """The raw tapped maps, float32 ``[B, C_k, H_k, W_k]`` at their own resolution."""
        x = self.prepare(images)
        for tap in self._taps:
            tap.reset()
        try:
            self.net.forward_features(x)
            outputs = [tap.value for tap in self._taps]
        finally:
            for tap in self._taps:
                tap.reset()
        for level, out in zip(self.spec.levels, outputs):
            if out is None:
                raise RuntimeError(f"{self.spec.name}: level {level.name!r} ({level.module}) did not run")
        return [out.float() for out in outputs]

    @torch.inference_mode()
    def to_grid(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw maps → float32 ``[B, M, M, C_k]``, bilinearly resized (align_corners=False) when not M×M."""
        m = self.spec.grid
        grids = []
        for out in taps:
            if tuple(out.shape[-2:]) != (m, m):
                out = F.interpolate(out, size=(m, m), mode="bilinear", align_corners=False)
            grids.append(out.permute(0, 2, 3, 1).contiguous().float())
        return grids

    @torch.inference_mode()
    def forward(self, images) -> list[torch.Tensor]:
        """uint8 ``[B, S, S, 3]`` RGB at ``spec.input_size`` → one float32 ``[B, M, M, C_k]`` per level."""
        return self.to_grid(self.forward_taps(images))

    @torch.inference_mode()
    def classify(self, images) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]``, for backbones that keep their classifier (checks that
        the weights and normalisation are the real ones)."""
        if not self.has_classifier:
            raise NotImplementedError(f"{self.spec.name} keeps no classifier head")
        x = self.prepare(images)
        for tap in self._taps:
            tap.reset()
        try:
            return self.net(x).float()
        finally:
            for tap in self._taps:
                tap.reset()
