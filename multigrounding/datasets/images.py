"""Opening an image file the way every stage will: fully decoded, its real size known.

Validation decodes each image once so that a truncated or undecodable file is found before a
multi-hour extraction meets it; extraction loads images through ``load_rgb`` so that grayscale,
CMYK, palette, alpha and 16-bit files all become the same 8-bit RGB the backbones expect.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

# A JPEG this many times larger than the target side (in both directions) is decoded at a reduced
# DCT scale first (Pillow's draft mode): a 10,000-pixel photo then costs megabytes, not a gigabyte.
DRAFT_FACTOR = 4
# Very large images are legitimate here (we resize them at once), up to this many pixels.
MAX_PIXELS = 400_000_000


class ImageProblem(ValueError):
    """The image file is missing, unreadable or does not decode."""


@contextlib.contextmanager
def _opened(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Open an image, turning every way a file can be bad into ImageProblem with a reason."""
    if not os.path.exists(path):
        raise ImageProblem("file not found")
    if not os.path.isfile(path):
        raise ImageProblem("not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
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


def inspect_image(path: str | os.PathLike) -> tuple[int, int]:
    """Decode the whole image and return its (width, height), or raise ImageProblem saying why."""
    with _opened(path) as image:
        image.load()
        return image.size


def load_rgb(path: str | os.PathLike, size: int, times: dict | None = None
             ) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as uint8 RGB [size, size, 3] (no crop, aspect not kept) and its original size.

    Alpha is dropped (the colour channels are kept as stored); 16-bit and float images are
    scaled to 0-255; EXIF orientation is ignored, as the datasets' boxes are in stored pixels.
    ``times``, if given, receives the seconds spent decoding and resizing (``decode``,
    ``resize``) and the CPU seconds of each (``decode_cpu``, ``resize_cpu``).
    """
    started, started_cpu = time.perf_counter(), time.thread_time()
    with _opened(path) as image:
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
