"""Opening an image file the way every stage will: fully decoded, its real size known.

Validation decodes each image once so that a truncated or undecodable file is found before a
multi-hour extraction meets it.
"""
from __future__ import annotations

import os
import warnings

from PIL import Image, UnidentifiedImageError


class ImageProblem(ValueError):
    """The image file is missing, unreadable or does not decode."""


def inspect_image(path: str | os.PathLike) -> tuple[int, int]:
    """Decode the whole image and return its (width, height), or raise ImageProblem saying why."""
    if not os.path.exists(path):
        raise ImageProblem("file not found")
    if not os.path.isfile(path):
        raise ImageProblem("not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return image.size
    except UnidentifiedImageError:
        raise ImageProblem("not an image format Pillow can decode") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem(f"too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        raise ImageProblem(f"does not decode: {exc}") from None
