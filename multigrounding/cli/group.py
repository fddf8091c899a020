"""The ``multigrounding`` click group: verbosity, and the package's and the machine's errors
turned into one-line messages. Every command module adds its commands to ``main``."""
from __future__ import annotations

import errno
import logging

import click

from multigrounding import __version__
from multigrounding.errors import MultigroundingError


# Errors of the machine rather than of the program: said in one line, never a traceback.
_ENVIRONMENT_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                       errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                       errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is a file",
                       errno.EIO: "input/output error"}


class _Group(click.Group):
    """A group whose commands turn the package's own errors, and the machine's (disk full,
    read-only, not permitted), into clean one-line messages."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MultigroundingError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            if exc.errno not in _ENVIRONMENT_ERRORS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(
                f"{where}{_ENVIRONMENT_ERRORS[exc.errno]}; nothing half-written was kept: fix that "
                f"and run the same command again") from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.version_option(__version__, prog_name="multigrounding")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Weakly supervised phrase grounding (Akbari et al., CVPR 2019).

    Learn where each phrase of a caption is in its image from image-caption pairs alone:
    convert a dataset to a manifest, cache frozen backbone features, train light mapping heads,
    evaluate with the pointing game and retrieval, ground one image.

    \b
    Start here (offline, on the CPU, a few minutes):
      multigrounding demo
    """
    level = max(logging.WARNING - 10 * verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
