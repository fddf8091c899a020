"""Opening an image file the way every stage will: fully decoded, its real size known.

Validation decodes each image once so that a truncated or undecodable file is found before a
multi-hour extraction meets it; extraction loads images through ``load_rgb`` so that grayscale,
CMYK, palette, alpha and 16-bit files all become the same 8-bit RGB the backbones expect.

An image named by URL (``s3://bucket/key``, or any scheme fsspec has installed: ``gs://`` with
gcsfs, ``https://``, ...) is read whole into memory through fsspec with the given storage options
(fsspec's names: ``endpoint_url``, ``key``, ``secret``, ...; for S3 it needs s3fs), one GET per
image, so that dask workers with no shared disk read the dataset from an object store. Local
paths are opened as before, with no fsspec in the way.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image, UnidentifiedImageError

from multigrounding.datasets.records import is_url
from multigrounding.errors import DatasetError

# A JPEG this many times larger than the target side (in both directions) is decoded at a reduced
# DCT scale first (Pillow's draft mode): a 10,000-pixel photo then costs megabytes, not a gigabyte.
DRAFT_FACTOR = 4
# Very large images are legitimate here (we resize them at once), up to this many pixels.
MAX_PIXELS = 400_000_000


class ImageProblem(ValueError):
    """The image file is missing, unreadable or does not decode."""


def read_url(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """The whole file at ``url`` (one request), or ImageProblem saying why not."""
    import fsspec

    scheme = url.partition(":")[0]
    try:
        fs, key = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as exc:
        raise ImageProblem(f"cannot read {scheme}:// URLs here ({exc})") from None
    except (TypeError, ValueError) as exc:
        raise ImageProblem(f"the storage options do not fit {scheme}:// ({exc})") from None
    try:
        return fs.cat_file(key)
    except FileNotFoundError:
        raise ImageProblem("file not found") from None
    except IsADirectoryError:
        raise ImageProblem("not a file") from None
    except Exception as exc:  # the store refused or did not answer: say what it said
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ImageProblem(f"cannot be read ({type(exc).__name__}: {reason})") from None


def check_url_access(images: Iterable[str], storage_options: Mapping[str, Any] | None = None) -> None:
    """Before a long run: the first image named by URL can be read with these options (a wrong
    endpoint or missing credentials would otherwise fail every image, one by one). A missing
    image is left for the run to record; a store that refuses is a DatasetError."""
    first = next((name for name in images if is_url(name)), None)
    if first is None:
        return
    try:
        read_url(first, storage_options)
    except ImageProblem as exc:
        if str(exc) != "file not found":
            raise DatasetError(f"{first}: {exc}; images named by URL are read with the storage "
                               "options (--storage-options, or the environment: AWS_* for "
                               "s3://)") from None


@contextlib.contextmanager
def _opened(path: str | os.PathLike,
            storage_options: Mapping[str, Any] | None = None) -> Iterator[Image.Image]:
    """Open an image, turning every way a file can be bad into ImageProblem with a reason."""
    if is_url(path):
        source = io.BytesIO(read_url(os.fspath(path), storage_options))
    else:
        if not os.path.exists(path):
            raise ImageProblem("file not found")
        if not os.path.isfile(path):
            raise ImageProblem("not a file")
        source = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageProblem(f"too large to decode safely ({image.width}x{image.height})")
                yield image
    except UnidentifiedImageError:
        raise ImageProblem("not an image format Pillow can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem(f"too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        if isinstance(exc, ImageProblem):
            raise
        raise ImageProblem(f"does not decode: {exc}") from None


def inspect_image(path: str | os.PathLike,
                  storage_options: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Decode the whole image and return its (width, height), or raise ImageProblem saying why.
    ``storage_options`` serve images named by URL."""
    with _opened(path, storage_options) as image:
        image.load()
        return image.size


def load_rgb(path: str | os.PathLike, size: int, times: dict | None = None,
             storage_options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as uint8 RGB [size, size, 3] (no crop, aspect not kept) and its original size.

    Alpha is dropped (the colour channels are kept as stored); 16-bit and float images are
    scaled to 0-255; EXIF orientation is ignored, as the datasets' boxes are in stored pixels.
    ``times``, if given, receives the seconds spent decoding and resizing (``decode``,
    ``resize``) and the CPU seconds of each (``decode_cpu``, ``resize_cpu``).
    ``storage_options`` serve images named by URL.
    """
    started, started_cpu = time.perf_counter(), time.thread_time()
    with _opened(path, storage_options) as image:
        original = image.size
        if (image.format == "JPEG" and image.width >= DRAFT_FACTOR * size
                and image.height >= DRAFT_FACTOR * size):
            image.draft("RGB", (DRAFT_FACTOR * size, DRAFT_FACTOR * size))
        image.load()
        rgb = _to_rgb(image)
        decoded, decoded_cpu = time.perf_counter(), time.thread_time()
        resized = np.asarray(rgb.resize((size, size), Image.BILINEAR), dtype=np.uint8)
        if times is not None:
            times["decode"], times["decode_cpu"] = decoded - started, decoded_cpu - started_cpu
            times["resize"] = time.perf_counter() - decoded
            times["resize_cpu"] = time.thread_time() - decoded_cpu
        return resized, original


def open_image(path: str | os.PathLike,
               storage_options: Mapping[str, Any] | None = None) -> Image.Image:
    """The whole image, decoded (for pictures): a local path or a URL; ImageProblem if not."""
    with _opened(path, storage_options) as image:
        image.load()
        return image.copy()


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float32)
        peak = float(values.max()) if values.size else 0.0
        if image.mode == "F":
            top = 1.0 if peak <= 1.0 else 255.0
        else:
            top = 65535.0 if image.mode.startswith("I;16") or peak > 255 else 255.0
        scaled = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")
