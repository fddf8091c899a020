"""One home for the errors a user can cause.

Each subclass also inherits the builtin it refines, so callers can catch either. Messages name the
file, the record and the problem, then the fix.
"""
import difflib


class MultigroundingError(Exception):
    """Base of every error this package raises on purpose."""


class DatasetError(MultigroundingError, ValueError):
    """A dataset file is missing a part, malformed, or not the expected structure."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset file or folder named by the user does not exist."""


class UnsafePickleError(DatasetError):
    """A pickle asked for something other than plain containers, strings and numbers."""


class UnknownNameError(MultigroundingError, LookupError):
    """A name not in a registry (dataset format, backbone, encoder)."""

    def __init__(self, kind: str, name: str, choices):
        choices = list(choices)
        close = difflib.get_close_matches(name, choices, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        super().__init__(f"unknown {kind} {name!r}; choose from {', '.join(choices)}.{hint}")
