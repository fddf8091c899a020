"""The ``multigrounding`` command: thin click commands, one library call each.

Only this package prints or draws progress bars. A user's mistake ends in a one-line message and
exit status 1 (2 for a wrong command line), never a traceback.

``group`` holds the click group ``main``; each command module adds its commands to it when
imported here, so ``from multigrounding.cli import main`` gets the whole command line.
"""
from __future__ import annotations

from multigrounding.cli import cache, checkpoint, datasets, demo, evaluate, extract, reproduce, train  # noqa: F401
from multigrounding.cli.group import main

__all__ = ["main"]
