"""Which torch device a stage runs on: one rule for extraction, training and evaluation.

torch is imported only when a device is resolved, so that commands which never touch a model
(``--help``, ``datasets``, ``cache info``) start fast.
"""
from __future__ import annotations

from multigrounding.errors import MultigroundingError


class DeviceError(MultigroundingError, ValueError):
    """A device name torch does not know, or a GPU asked for where there is none."""


def resolve_device(device: str = "auto") -> str:
    """``auto`` is ``cuda`` when there is a GPU, else ``cpu``; other names are checked and kept."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use "
                          "--device cpu (or auto)")
    return str(parsed)
