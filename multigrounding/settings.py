"""Typed settings for the stages' flat config dataclasses: each field declares its help, type,
range or choices once (``setting``), and from that the command line's options are generated
(``cli/options.py``) and JSON configs are type-checked (``from_mapping``), so a default or a
range lives in one place only."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import field
from pathlib import Path
from typing import Any, Iterable

from multigrounding.errors import MultigroundingError


class ConfigError(MultigroundingError, ValueError):
    """A training config that cannot be used: unknown key, wrong type, out of range."""


def setting(default: Any, help: str, *, kind: str, minimum: float | None = None,
            above: float | None = None, choices: Iterable[str] | None = None,
            cli: bool = True, path: str | None = None, registry: str | None = None,
            required: bool = False) -> Any:
    """A config field with what the command line and the type check need.

    ``kind``: int, float, str, bool, ints (a list of integers, ``1,2,3`` on the command line) or
    path. ``minimum`` is inclusive, ``above`` exclusive. ``path``: ``dir`` or ``file`` for paths,
    ``store`` for a store that may be a local folder or an object-store URL (kept as text).
    ``registry`` names a registry whose names are the choices (the command line lists them).
    ``required``: None is not a value for it (a config without it is incomplete).
    """
    metadata = {"help": help, "kind": kind, "minimum": minimum, "above": above,
                "choices": tuple(choices) if choices else None, "cli": cli, "path": path,
                "registry": registry, "required": required}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def from_mapping(cls, data: Any, source: str):
    """An instance of the settings dataclass ``cls`` from JSON-like data: every key known, every
    value of its field's type and in its range, else a ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config is a JSON object ({{\"epochs\": 20, ...}}), not "
                          f"{_kind_name(data)}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.init and "kind" in f.metadata}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} (known keys: "
                          f"{', '.join(sorted(known))})")
    return cls(**{name: check_value(known[name], value, source) for name, value in data.items()})


def check_value(item: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` if it fits field ``item`` (type, range, choices), else a ConfigError naming it."""
    meta = item.metadata
    kind, where = meta["kind"], f"{source}: {item.name}"
    if value is None:
        if item.default is None or meta.get("required"):
            return None
        raise ConfigError(f"{where}: needs a value ({_expected(meta)}), not null")
    if kind == "ints":
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list of integers, got {_kind_name(value)}")
        return [_number(meta, v, f"{where}[{i}]", integer=True) for i, v in enumerate(value)]
    if kind in ("int", "float"):
        return _number(meta, value, where, integer=kind == "int")
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_kind_name(value)}")
        return value
    if not isinstance(value, (str, Path)) or (kind == "path" and not str(value)):
        raise ConfigError(f"{where}: expected {_expected(meta)}, got {_kind_name(value)}")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(meta['choices'])}")
    return str(value)


def _number(meta: dict, value: Any, where: str, integer: bool) -> int | float:
    ok = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok:
        raise ConfigError(f"{where}: expected {_expected(meta)}, got {_kind_name(value)}")
    if not integer and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value}")
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ConfigError(f"{where}: must be at least {meta['minimum']:g}, got {value}")
    if meta["above"] is not None and value <= meta["above"]:
        raise ConfigError(f"{where}: must be greater than {meta['above']:g}, got {value}")
    return int(value) if integer else float(value)


def _expected(meta: dict) -> str:
    kind = meta["kind"]
    text = {"int": "an integer", "float": "a number", "bool": "true or false",
            "ints": "a list of integers", "str": "a string", "path": "a path"}[kind]
    if meta["minimum"] is not None:
        text += f" >= {meta['minimum']:g}"
    if meta["above"] is not None:
        text += f" > {meta['above']:g}"
    return text


def _kind_name(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    return {list: "a list", dict: "an object", type(None): "null"}.get(type(value), type(value).__name__)


def read_json_object(path: str | Path) -> dict:
    """A JSON object from a file, with a one-line error for each way it can be wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]   # a UTF-8 byte-order mark, as some editors write: not part of the JSON
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a JSON object ({{\"epochs\": 20, ...}}), not "
                          f"{_kind_name(data)}")
    return data
