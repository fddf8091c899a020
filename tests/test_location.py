"""Store locations: parsing, zarr stores, tensorstore kvstores and file operations, locally and
on a real S3 server (moto on 127.0.0.1)."""
from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorstore as ts
import zarr

from multigrounding.cache.location import Location, LocationError, parse_storage_options


@pytest.fixture(autouse=True)
def no_aws_environment(monkeypatch):
    """The user's own AWS settings must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)


def _write_example(group: zarr.Group) -> np.ndarray:
    """A small sharded float16 array like a visual level, plus attributes."""
    values = np.arange(6 * 3 * 3 * 5, dtype=np.float16).reshape(6, 3, 3, 5)
    array = group.create_array("visual/level0", shape=values.shape, dtype="float16",
                               chunks=(1, 3, 3, 5), shards=(3, 3, 3, 5),
                               compressors=zarr.codecs.ZstdCodec(level=1), fill_value=0)
    array[:] = values
    group.attrs["multigrounding"] = {"kind": "images"}
    return values


# ---------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, url", [
    ("cache/dir", "cache/dir"),
    ("/abs/cache", "/abs/cache"),
    ("file:///abs/cache", "/abs/cache"),
    ("FILE:///abs/cache", "/abs/cache"),
    ("s3://bucket/a/b/", "s3://bucket/a/b"),
    ("s3a://bucket/a", "s3://bucket/a"),
    ("S3://bucket", "s3://bucket"),
    ("memory://x/y", "memory://x/y"),
])
def test_parse(text, url):
    location = Location.parse(text)
    assert location.url == url
    assert location.is_local == ("://" not in url)


def test_joinpath_keeps_the_storage_options():
    options = {"endpoint_url": "http://127.0.0.1:9"}
    below = Location.parse("s3://b/p/", options).joinpath("visual/", "level0")
    assert below.url == "s3://b/p/visual/level0" and dict(below.storage_options) == options
    assert Location.parse("some/dir").joinpath("visual", "level0").path == Path(
        "some/dir/visual/level0")
    with pytest.raises(LocationError, match="not a local path"):
        below.path


def test_storage_options_are_kept_for_urls_and_dropped_for_local_paths():
    options = {"endpoint_url": "http://127.0.0.1:9"}
    assert dict(Location.parse("s3://b/p", options).storage_options) == options
    assert dict(Location.parse("some/dir", options).storage_options) == {}


@pytest.mark.parametrize("text, options, message", [
    ("s3://", None, "no bucket"),
    ("x3://bucket/p", None, "unknown storage scheme 'x3'"),
    ("gs://bucket/p", None, "gcsfs"),
    ("s3://b/p", {"endpoint": "http://x"}, "endpoint not supported"),
    ("s3://b/p", {"client_kwargs": {"verify": False}}, "client_kwargs.verify"),
    ("s3://b/p", {"key": "k"}, "both key and secret"),
])
def test_parse_errors_name_the_problem(text, options, message):
    with pytest.raises(LocationError, match=message):
        Location.parse(text, options)


@pytest.mark.parametrize("text, message", [
    ("{bad", "not valid JSON"), ("[1]", "JSON object"), ('"s"', "JSON object")])
def test_storage_options_text_errors(text, message):
    with pytest.raises(LocationError, match=message):
        parse_storage_options(text)


def test_secrets_are_masked_in_the_repr():
    location = Location.parse("s3://b/p", {"key": "AKIA-ID", "secret": "s3cr3t", "token": "tok",
                                           "endpoint_url": "http://h:1"})
    shown = repr(location)
    assert "s3cr3t" not in shown and "AKIA-ID" not in shown and "tok'" not in shown
    assert "http://h:1" in shown and "s3://b/p" in shown


def test_storage_options_text():
    assert parse_storage_options(None) == {}
    assert parse_storage_options(' {"anon": true} ') == {"anon": True}


# ---------------------------------------------------------------------- local: as before
def test_a_local_store_is_byte_identical_to_plain_zarr(tmp_path):
    plain = zarr.open_group(str(tmp_path / "plain"), mode="w")
    _write_example(plain)
    location = Location.parse(tmp_path / "via")
    _write_example(location.open_group("w"))
    files = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*")
                   if p.is_file())
    assert files == sorted(Path(k) for k in location.keys())
    for name in files:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "via" / name).read_bytes()
    assert location.kvstore_spec("visual/level0") == {
        "driver": "file", "path": str(tmp_path / "via" / "visual" / "level0")}


def test_local_file_operations(tmp_path):
    location = Location.parse(tmp_path / "store")
    assert not location.exists()
    location.write_bytes("a/b.json", b"{}")
    location.write_bytes(".lock", b"")
    assert location.exists() and location.exists("a/b.json")
    assert location.read_bytes("a/b.json") == b"{}"
    assert location.keys() == [".lock", "a/b.json"]
    assert location.children() == [".lock", "a"]
    assert location.total_bytes() == 2
    assert not list((tmp_path / "store" / "a").glob("*.partial"))
    location.delete_all(keep=(".lock",))
    assert location.keys() == [".lock"]
    location.delete(".lock")
    location.delete(".lock")          # missing: not an error
    assert location.keys() == []


# ---------------------------------------------------------------------- S3
@pytest.fixture
def s3_location(s3_server, s3_bucket):
    return Location.parse(f"s3://{s3_bucket}/caches/one", s3_server.storage_options)


def test_an_s3_store_holds_the_same_bytes_as_a_local_one(tmp_path, s3_server, s3_location):
    local = Location.parse(tmp_path / "local")
    _write_example(local.open_group("w"))
    values = _write_example(s3_location.open_group("w"))
    bucket, prefix = s3_location.url[5:].split("/", 1)
    listed = s3_server.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]
    assert sorted(o["Key"][len(prefix) + 1:] for o in listed) == local.keys() == s3_location.keys()
    for key in local.keys():
        assert s3_location.read_bytes(key) == local.read_bytes(key)
    assert s3_location.total_bytes() == local.total_bytes() == sum(o["Size"] for o in listed)
    group = s3_location.open_group("r")
    assert group.attrs["multigrounding"] == {"kind": "images"}
    np.testing.assert_array_equal(group["visual/level0"][:], values)


def test_tensorstore_reads_the_s3_store(s3_location):
    values = _write_example(s3_location.open_group("w"))
    spec = s3_location.kvstore_spec("visual/level0")
    assert spec["driver"] == "s3" and spec["endpoint"].startswith("http://127.0.0.1:")
    assert spec["aws_credentials"]["type"] == "profile"
    credentials = Path(spec["aws_credentials"]["credentials_file"])
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    array = ts.open({"driver": "zarr3", "kvstore": spec}, read=True).result()
    rows = [4, 0, 5]
    np.testing.assert_array_equal(array[rows].read().result(), values[rows])


def test_s3_file_operations(s3_location):
    assert not s3_location.exists()
    s3_location.write_bytes("zarr.json", b"{}")
    s3_location.write_bytes(".lock.json", b"held")
    s3_location.write_bytes("visual/level0/c/0/0/0/0", b"x" * 10)
    assert s3_location.exists() and s3_location.exists("zarr.json")
    assert not s3_location.exists("nothing")
    assert s3_location.keys("visual") == ["visual/level0/c/0/0/0/0"]
    assert s3_location.children() == [".lock.json", "visual", "zarr.json"]
    assert s3_location.total_bytes() == 2 + 4 + 10
    with pytest.raises(FileNotFoundError, match="nothing"):
        s3_location.read_bytes("nothing")
    s3_location.delete_all(keep=(".lock.json",))
    assert s3_location.keys() == [".lock.json"]
    s3_location.delete(".lock.json")
    s3_location.delete(".lock.json")
    assert not s3_location.exists()


def test_prefixes_of_one_bucket_do_not_see_each_other(s3_server, s3_bucket):
    options = s3_server.storage_options
    one = Location.parse(f"s3://{s3_bucket}/a", options)
    other = Location.parse(f"s3://{s3_bucket}/ab", options)
    one.write_bytes("k", b"1")
    other.write_bytes("k", b"2")
    one.delete_all()
    assert other.keys() == ["k"] and not one.exists()


def test_the_endpoint_and_credentials_can_come_from_the_environment(monkeypatch, s3_server,
                                                                     s3_location):
    values = _write_example(s3_location.open_group("w"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    bare = Location.parse(s3_location.url)
    assert bare.storage_options == {"endpoint_url": s3_server.endpoint_url,
                                    "client_kwargs": {"region_name": "us-east-1"}}
    np.testing.assert_array_equal(bare.open_group("r")["visual/level0"][:], values)
    spec = bare.kvstore_spec("visual/level0")
    # keys in the environment are read from it directly, not through the default chain (which
    # logs an error line per read where ~/.aws is missing)
    assert spec["aws_credentials"] == {"type": "environment"}
    array = ts.open({"driver": "zarr3", "kvstore": spec}, read=True).result()
    np.testing.assert_array_equal(array[[1, 2]].read().result(), values[[1, 2]])
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    assert bare.kvstore_spec("x")["aws_credentials"] == {"type": "default"}   # profile, role ...


@pytest.mark.parametrize("endpoint_from", ["options", "environment"])
def test_a_location_travels_to_another_process(tmp_path, monkeypatch, s3_server, s3_location,
                                               endpoint_from):
    """What a dask task carries: the pickled location; the worker builds its own clients. An
    endpoint taken from the client's environment travels too."""
    values = _write_example(s3_location.open_group("w"))
    if endpoint_from == "environment":
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
        options = {k: v for k, v in s3_server.storage_options.items() if k != "endpoint_url"}
        s3_location = Location.parse(s3_location.url, options)
    payload = tmp_path / "location.pickle"
    payload.write_bytes(pickle.dumps(s3_location))
    script = ("import pickle, sys, json\n"
              "location = pickle.loads(open(sys.argv[1], 'rb').read())\n"
              "print(json.dumps(location.open_group('r')['visual/level0'][:].tolist()))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out = subprocess.run([sys.executable, "-c", script, str(payload)], env=env, check=True,
                         capture_output=True, text=True).stdout
    np.testing.assert_array_equal(np.array(json.loads(out), dtype=np.float16), values)


# ---------------------------------------------------------------------- other fsspec schemes
def test_a_memory_location_goes_through_fsspec_and_has_no_kvstore():
    location = Location.parse("memory://multigrounding-test/store")
    values = _write_example(location.open_group("w"))
    assert "FsspecStore" in type(location.zarr_store()).__name__
    np.testing.assert_array_equal(location.open_group("r")["visual/level0"][:], values)
    assert location.kvstore_spec("visual/level0") is None
    assert location.obstore() is None
    assert "zarr.json" in location.keys()
    assert location.children() == ["visual", "zarr.json"]
    location.delete_all()
    assert not location.exists()


def test_zarr_rows_reads_random_rows_where_tensorstore_cannot():
    from multigrounding.cache.zarr_rows import read_rows

    location = Location.parse("memory://multigrounding-test/rows")
    values = _write_example(location.open_group("w"))
    level = location.open_group("r")["visual/level0"]
    rows = [5, 0, 3, 3]
    (got,) = read_rows([level], rows)
    np.testing.assert_array_equal(got, values[rows])
    (empty,) = read_rows([level], [])
    assert empty.shape == (0, 3, 3, 5) and empty.dtype == np.float16
    with pytest.raises(IndexError, match=r"\[0, 6\)"):
        read_rows([level], [6])
    location.delete_all()
