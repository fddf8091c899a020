"""The backbone registry: register a builder by name, list names, build one by name or from the
weights record a store or checkpoint kept."""
from __future__ import annotations

import difflib
import fnmatch
import logging
import os
from pathlib import Path
from typing import Any

import torch

from multigrounding.cache.fingerprint import file_sha256
from multigrounding.cache.image_store import ImageStoreConfig
from multigrounding.errors import UnknownNameError
from multigrounding.pipeline.backbones.base import (Backbone, BackboneBuilder, BackboneSpec,
                                                    WeightsMismatchError, WeightsRecord,
                                                    WeightsUnavailableError)
from multigrounding.pipeline.backbones.weights import check_hash, load_state_dict, read_state_dict

log = logging.getLogger(__name__)

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
            check_hash(record, path, sha256)
        state = read_state_dict(path)
        load_state_dict(net, state, path, spec.name, builder.dropped_prefixes)
        info["source"] = record.source if kind == "imagenet" else str(Path(path).resolve())
        info["sha256"] = sha256
        if kind == "imagenet":
            info["file"] = str(Path(path).resolve())
        log.info("%s: loaded %s weights from %s (sha256 %s)", spec.name, kind, path, sha256)
    backbone = Backbone(spec, net, info, normalisation, has_classifier=builder.has_classifier)
    return backbone.to(torch.device(device))


def create_backbone_from(config: ImageStoreConfig, *, device: str | torch.device = "cpu") -> Backbone:
    """The backbone a visual store was extracted with (its config names the backbone and keeps
    its weights record), with the same weights: their sha256 must equal the recorded one."""
    recorded = config.weights
    kind = recorded.get("weights")
    source = {"imagenet": recorded.get("record") or "imagenet", "random": "random"}.get(
        kind, recorded.get("source"))
    backbone = create_backbone(config.backbone, source, seed=recorded.get("seed") or 0,
                               device=device)
    if backbone.weights_info.get("sha256") != recorded.get("sha256"):
        raise WeightsMismatchError(
            f"{config.backbone} weights {source} have sha256 {backbone.weights_info.get('sha256')}, "
            f"not the {recorded.get('sha256')} the features were extracted with")
    return backbone


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
