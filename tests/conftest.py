"""Shared test helpers: small generated images in the formats the readers meet."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: str | Path, width: int = 64, height: int = 48, seed: int = 0,
                mode: str = "RGB", fmt: str | None = None) -> Path:
    """Write a small random image (any PIL mode) and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt)
    return path


def write_truncated_jpeg(path: str | Path, width: int = 64, height: int = 48) -> Path:
    """A JPEG cut in half: it opens (the header is intact) but does not decode."""
    path = write_image(path, width, height)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    return path


def write_jsonl(path: str | Path, rows: list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def image_factory(tmp_path):
    """``image_factory("images/a.jpg", 64, 48)`` writes an image under tmp_path."""
    def make(relative: str, width: int = 64, height: int = 48, **kwargs) -> Path:
        return write_image(tmp_path / relative, width, height, **kwargs)
    return make


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server on 127.0.0.1 (a free port) for the whole session (tests/s3_server.py)."""
    from s3_server import LocalS3

    with LocalS3() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the session's S3 server; its name."""
    return s3_server.new_bucket()
