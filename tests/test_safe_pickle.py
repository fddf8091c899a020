"""The safe unpickler loads the datasets' plain pickles and refuses anything that could run code."""
from __future__ import annotations

import os
import pickle

import pytest

from multigrounding.datasets.safe_pickle import load_pickle
from multigrounding.errors import DatasetError, DatasetNotFoundError, UnsafePickleError

EXPECTED = "a dict {'train': set, 'test': set}"


class Custom:
    """A class of the test module: harmless, but not a plain builtin."""

    def __init__(self, value):
        self.value = value


class RunsCommand:
    """Unpickling this with the plain pickle module would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_protocol_2_dict_of_sets_and_containers(tmp_path):
    value = {"train": {1, 2, 3}, "test": frozenset({4}), "meta": [("a", 1.5, None, True)],
             "big": 2 ** 70}
    path = write(tmp_path / "splits.pickle", pickle.dumps(value, protocol=2))
    assert load_pickle(path, EXPECTED) == value


def test_python2_protocol_0_pickle_with_byte_strings_and_longs(tmp_path):
    # What Python 2 writes for {'train': set([1, 2, 3L]), 'test': set([4]), 'name': 'caf\xe9'}.
    data = (b"(dp0\nS'train'\np1\nc__builtin__\nset\np2\n((lp3\nI1\naI2\naL3L\natp4\nRp5\n"
            b"sS'test'\np6\ng2\n((lp7\nI4\natp8\nRp9\nsS'name'\np10\nS'caf\\xe9'\np11\ns.")
    path = write(tmp_path / "py2.pickle", data)
    assert load_pickle(path, EXPECTED) == {"train": {1, 2, 3}, "test": {4}, "name": "caf\xe9"}


@pytest.mark.parametrize("module", [b"copy_reg", b"copyreg"])
def test_copy_reg_reconstructor_of_a_set(tmp_path, module):
    data = (b"c" + module + b"\n_reconstructor\n(c__builtin__\nset\nc__builtin__\nset\n"
            b"(lp0\nI7\natRp1\n.")
    path = write(tmp_path / "reconstructed.pickle", data)
    assert load_pickle(path, EXPECTED) == {7}


def test_refuses_os_system_and_never_runs_it(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path / "evil.pickle",
                 pickle.dumps({"train": RunsCommand(f"touch {marker}")}, protocol=2))
    with pytest.raises(UnsafePickleError) as info:
        load_pickle(path, EXPECTED)
    message = str(info.value)
    assert str(path) in message
    assert f"{os.system.__module__}.system" in message  # posix.system on Linux
    assert not marker.exists()


def test_refuses_a_custom_class(tmp_path):
    path = write(tmp_path / "custom.pickle", pickle.dumps([Custom(3)], protocol=2))
    with pytest.raises(UnsafePickleError, match=rf"{__name__}\.Custom"):
        load_pickle(path, EXPECTED)


@pytest.mark.parametrize("data, forbidden", [
    (b"cbuiltins\neval\n(S'1+1'\ntR.", "builtins.eval"),
    (b"c__builtin__\ngetattr\n(c__builtin__\nset\nS'add'\ntR.", "__builtin__.getattr"),
    (b"csubprocess\ncall\n(S'true'\ntR.", "subprocess.call"),
])
def test_refuses_builtins_that_are_not_plain_types(tmp_path, data, forbidden):
    path = write(tmp_path / "builtin.pickle", data)
    with pytest.raises(UnsafePickleError, match=forbidden.replace(".", r"\.")):
        load_pickle(path, EXPECTED)


@pytest.mark.parametrize("data", [
    b"this is a text file, not a pickle\n",
    pickle.dumps({"train": set(range(100))}, protocol=2)[:-20],
    b"",
    b"\x80\x02}q\x00(X\x05\x00\x00\x00train",
])
def test_not_a_pickle_or_truncated_is_a_dataset_error_naming_the_file(tmp_path, data):
    path = write(tmp_path / "broken.pickle", data)
    with pytest.raises(DatasetError) as info:
        load_pickle(path, EXPECTED)
    assert not isinstance(info.value, UnsafePickleError)
    assert str(path) in str(info.value)
    assert "expected a dict" in str(info.value)


def test_empty_file_says_so(tmp_path):
    path = write(tmp_path / "empty.pickle", b"")
    with pytest.raises(DatasetError, match="empty or truncated"):
        load_pickle(path, EXPECTED)


def test_missing_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nothere.pickle"):
        load_pickle(tmp_path / "nothere.pickle", EXPECTED)


def test_a_folder_is_not_a_pickle(tmp_path):
    with pytest.raises(DatasetError, match="not a file"):
        load_pickle(tmp_path, EXPECTED)
