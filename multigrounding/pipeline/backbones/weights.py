"""Weight files: reading a state dict safely, loading it strictly with clear messages, checking
hashes, and fetching named weights with the libraries' own download-and-cache."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from multigrounding.pipeline.backbones.base import (BackboneSpec, WeightsMismatchError, WeightsRecord,
                                                    WeightsUnavailableError)

log = logging.getLogger(__name__)

# --- reading and loading weight files ----------------------------------------------------------

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub's convention: name-<sha256 prefix>.pth


def check_hash(record: WeightsRecord, path: Path, sha256: str) -> None:
    expected = record.sha256
    match = _HASH_IN_NAME.search(Path(urlparse(record.source).path).name)
    if expected is None and match:
        expected = match.group(1)
    if expected and not sha256.startswith(expected):
        raise WeightsMismatchError(
            f"weights file {str(path)!r} has sha256 {sha256}, but the {record.name!r} record expects "
            f"{expected}: the file is damaged or a different one. Delete it and fetch it again "
            f"({record.source}).")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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


def load_state_dict(net: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str,
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

def fetch_torch_hub(spec: BackboneSpec, record: WeightsRecord) -> Path:
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


def fetch_hf_hub(spec: BackboneSpec, record: WeightsRecord) -> Path:
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
