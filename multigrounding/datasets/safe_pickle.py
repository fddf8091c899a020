"""Loading the pickles that datasets ship (ReferIt refs, the Visual Genome split) without risk.

``pickle.load`` on a downloaded file runs whatever callable the file names. These files only
hold lists, dicts, sets, strings and numbers, so the unpickler here resolves nothing else: a pickle
that asks for any other global is refused before anything of it runs. Python 2 pickles
(``__builtin__``, ``copy_reg``, byte strings) load with ``encoding="latin1"``.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

from multigrounding.errors import DatasetError, DatasetNotFoundError, UnsafePickleError

_BUILTIN_NAMES = frozenset({
    "set", "frozenset", "dict", "list", "tuple", "str", "int", "float", "bool",
    "unicode", "long",  # Python 2 names, mapped to str and int by fix_imports
})

# (module, name) pairs allowed besides the builtins above. copy_reg._reconstructor rebuilds a
# builtin container in protocol 0/1 pickles; the classes it gets go through find_class too.
_OTHER_GLOBALS = frozenset({
    ("copyreg", "_reconstructor"),
    ("copy_reg", "_reconstructor"),
})


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves plain builtin types only and refuses every other global."""

    def __init__(self, handle: io.BufferedReader, path: Path, expected: str):
        super().__init__(handle, fix_imports=True, encoding="latin1")
        self._path = path
        self._expected = expected

    def find_class(self, module: str, name: str) -> Any:
        if _is_allowed(module, name):
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._path}: refused to load: the pickle asks for {module}.{name}, which could "
            f"run code; expected {self._expected} made of plain containers, strings and numbers "
            "only. Use the file from the dataset's official download.")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._path}: refused to load: the pickle holds a persistent "
                                f"id ({pid!r}); expected {self._expected}")


def load_pickle(path: str | os.PathLike, expected: str) -> Any:
    """Unpickle ``path`` allowing plain builtins only; ``expected`` describes it in messages.

    Raises DatasetNotFoundError if the file is missing, UnsafePickleError naming the forbidden
    ``module.name`` if the pickle references anything else, and DatasetError if the file is not
    a (complete) pickle.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetNotFoundError(f"{path}: not found (expected {expected} in a pickle file)")
    if not path.is_file():
        raise DatasetError(f"{path}: not a file (expected {expected} in a pickle file)")
    try:
        with open(path, "rb") as handle:
            return _RestrictedUnpickler(handle, path, expected).load()
    except UnsafePickleError:
        raise
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except EOFError:
        raise DatasetError(f"{path}: the pickle is empty or truncated (expected {expected})") \
            from None
    except Exception as exc:  # a damaged pickle can fail with almost any error type
        raise DatasetError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc}); "
                           f"expected {expected}") from None


def _is_allowed(module: str, name: str) -> bool:
    if module in ("builtins", "__builtin__"):
        return name in _BUILTIN_NAMES
    return (module, name) in _OTHER_GLOBALS
