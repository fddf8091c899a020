"""Caches on an object store, through the command line, against a real S3 server (moto on
127.0.0.1): everything that holds for a local store holds for ``s3://`` — the same bytes,
resume after kill -9, done flags after the data, fingerprint refusal and --overwrite, the
writer lock, checksums and missing-chunk errors with repair — and training, evaluation and the
cache commands read from it. Manifests may name their images by URL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from multigrounding.cache.errors import CacheDamagedError
from multigrounding.cache.image_store import ImageFeatureStore
from multigrounding.cache.location import Location
from multigrounding.cache.reader import TextBatchReader, VisualBatchReader
from multigrounding.cache.store import writer_lock
from multigrounding.cli import main
from multigrounding.datasets.records import Record
from multigrounding.datasets.synth import generate_synth
from multigrounding.heads.data import PairedCaches

BACKBONE = ["--backbone", "efficientnet_lite0", "--weights", "random", "--seed", "3"]
IMAGE_ARGS = [*BACKBONE, "--shard-size", "2", "--batch-size", "2"]
LOCKS = (".lock", ".lock.json")


@pytest.fixture(autouse=True)
def no_aws_environment(monkeypatch):
    """The user's own AWS settings must not leak into these tests (nor into their children)."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)


def run(*args) -> "CliRunner.Result":
    return CliRunner().invoke(main, [str(a) for a in args])


def objects(where: str | Path, s3=None) -> dict[str, bytes]:
    """Every file or object of a store, by key, without its lock."""
    if isinstance(where, Path):
        return {p.relative_to(where).as_posix(): p.read_bytes() for p in sorted(where.rglob("*"))
                if p.is_file() and p.name not in LOCKS}
    bucket, _, prefix = where[len("s3://"):].partition("/")
    client, found = s3.client(), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            key = item["Key"][len(prefix) + 1:]
            if key not in LOCKS:
                found[key] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found


def header(store: dict[str, bytes]) -> dict:
    return json.loads(store["zarr.json"])["attributes"]["multigrounding"]


def assert_same_store(want: dict[str, bytes], got: dict[str, bytes], same_manifest: bool = True):
    """Byte for byte, every object; the root's header may differ only in its creation time (and
    in the manifest, when the same images were named another way)."""
    assert sorted(want) == sorted(got)
    for key in want:
        if key != "zarr.json":
            assert want[key] == got[key], key
    if same_manifest:
        a, b = header(want), header(got)
        a.pop("created"), b.pop("created")
        assert a == b


def upload(s3, folder: Path, bucket: str, prefix: str) -> str:
    """A local store (or image folder) copied to s3://bucket/prefix, file by file."""
    client = s3.client()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in LOCKS:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                              Body=path.read_bytes())
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, 12, seed=5, size=64)
    return root / "manifest.jsonl"


@pytest.fixture(scope="module")
def local(synth, tmp_path_factory):
    """The reference: both stores extracted into local folders."""
    root = tmp_path_factory.mktemp("local")
    images = run("extract", "images", synth, "--cache", root / "images", *IMAGE_ARGS,
                 "--scheduler", "threads")
    assert images.exit_code == 0, images.output
    text = run("extract", "text", synth, "--cache", root / "text", "--shard-size", "16",
               "--token-shard", "64", "--scheduler", "threads")
    assert text.exit_code == 0, text.output
    return root


@pytest.fixture(scope="module")
def remote(synth, s3_server):
    """The same two extractions written straight into a bucket (read-only for the tests)."""
    bucket = s3_server.new_bucket("remote")
    options = json.dumps(s3_server.storage_options)
    images = run("extract", "images", synth, "--cache", f"s3://{bucket}/images", *IMAGE_ARGS,
                 "--scheduler", "threads", "--storage-options", options)
    assert images.exit_code == 0, images.output
    text = run("extract", "text", synth, "--cache", f"s3://{bucket}/text", "--shard-size", "16",
               "--token-shard", "64", "--scheduler", "threads", "--storage-options", options)
    assert text.exit_code == 0, text.output
    return bucket


def copy_prefix(s3, bucket: str, source: str, target: str) -> str:
    client = s3.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=source + "/"):
        for item in page.get("Contents", []):
            client.copy_object(Bucket=bucket, Key=target + item["Key"][len(source):],
                               CopySource={"Bucket": bucket, "Key": item["Key"]})
    return f"s3://{bucket}/{target}"


# ---------------------------------------------------------------------- the same bytes
def test_an_s3_store_holds_the_same_bytes_as_a_local_one(local, remote, s3_server):
    for kind in ("images", "text"):
        got = objects(f"s3://{remote}/{kind}", s3_server)
        assert_same_store(objects(local / kind), got)
        assert done_flags(got) == done_flags(objects(local / kind))
        # the storage options (endpoint, keys) are nowhere in the store
        text = got["zarr.json"].decode()
        assert s3_server.endpoint_url.split("//")[1] not in text and "secret" not in text
    listing = s3_server.client().list_objects_v2(Bucket=remote)["Contents"]
    assert not [o["Key"] for o in listing if o["Key"].endswith(LOCKS)]   # the lock was released


def done_flags(store: dict[str, bytes]) -> list[str]:
    return sorted(k for k in store if k.startswith("done/c/"))


def test_cache_commands_read_a_url(local, remote, s3_server):
    options = json.dumps(s3_server.storage_options)
    url = f"s3://{remote}/images"
    info = run("cache", "info", url, "--storage-options", options)
    assert info.exit_code == 0, info.output
    assert f"{url}: images store" in info.output and "shards_done 6, shards 6" in info.output
    for kind in ("images", "text"):
        verify = run("cache", "verify", f"s3://{remote}/{kind}", "--storage-options", options)
        assert verify.exit_code == 0 and "0 problems" in verify.output, verify.output
    plan = run("cache", "plan", _manifest_of(local), "--cache", url)
    assert plan.exit_code == 0 and "free at" not in plan.output, plan.output
    # without the storage options the store is not found, and the message says what to give
    missing = run("cache", "info", url, "--storage-options", json.dumps(
        {**s3_server.storage_options, "endpoint_url": s3_server.endpoint_url + "/nowhere"}))
    assert missing.exit_code == 1 and "Traceback" not in missing.output
    bad = run("cache", "info", url, "--storage-options", "{endpoint_url: 1}")
    assert bad.exit_code == 1 and "--storage-options: not valid JSON" in bad.output


def _manifest_of(local: Path) -> Path:
    return Path(ImageFeatureStore.open(local / "images").config.manifest_path)


def test_batches_read_from_s3_equal_local_ones_cold_and_warm(local, remote, s3_server):
    here = VisualBatchReader(local / "images")
    there = VisualBatchReader(Location.parse(f"s3://{remote}/images", s3_server.storage_options),
                              cache_bytes=10**8)
    rows = [7, 0, 11, 3]
    for _ in range(2):                # the second read comes from the chunk cache
        for a, b in zip(here.read(rows), there.read(rows)):
            assert a.tobytes() == b.tobytes()


def test_a_scheme_without_a_tensorstore_kvstore_is_read_through_zarr(local):
    """memory:// has no tensorstore driver: the reader falls back to zarr-python, same rows."""
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.put(str(local / "images"), "/fallback", recursive=True)
    try:
        there = VisualBatchReader(Location.parse("memory://fallback"))
        rows = [5, 1, 9]
        for a, b in zip(VisualBatchReader(local / "images").read(rows), there.read(rows)):
            assert a.tobytes() == b.tobytes()
    finally:
        memory.rm("/fallback", recursive=True)


# ---------------------------------------------------------------------- resume, refusal, lock
def test_kill_9_then_resume_on_s3_gives_the_same_bytes(synth, local, s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/killed"
    command = [sys.executable, "-m", "multigrounding", "extract", "images", str(synth), "--cache",
               url, *IMAGE_ARGS, "--scheduler", "synchronous", "--storage-options",
               json.dumps(s3_server.storage_options)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = s3_server.client()

    def done_now() -> list[str]:
        listing = client.list_objects_v2(Bucket=s3_bucket, Prefix="killed/done/c/")
        return [o["Key"] for o in listing.get("Contents", [])]

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and len(done_now()) < 2:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished = len(done_now())
    assert 2 <= finished < 6
    # done flags come after the data: every shard marked done has all its objects
    store = ImageFeatureStore.open(Location.parse(url, s3_server.storage_options))
    assert store.missing_chunks() == {}
    # the dead writer's lock object is still there, and taken over at once (same machine)
    assert client.list_objects_v2(Bucket=s3_bucket, Prefix="killed/.lock.json").get("KeyCount") == 1
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({finished} were done before)" in resumed.stdout
    assert_same_store(objects(local / "images"), objects(url, s3_server))


def test_other_settings_are_refused_and_overwrite_replaces_only_a_store(synth, s3_server, s3_bucket):
    options = json.dumps(s3_server.storage_options)
    small = synth.parent / "small.jsonl"
    small.write_text("".join(synth.read_text().splitlines(keepends=True)[:2]))
    url = f"s3://{s3_bucket}/store"

    def extract(*extra):
        return run("extract", "images", small, "--cache", url, *IMAGE_ARGS, "--scheduler",
                   "synchronous", "--storage-options", options, *extra)

    assert extract().exit_code == 0
    other = extract("--seed", "4")
    assert other.exit_code == 1 and "weights.seed: 3 -> 4" in other.output, other.output
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="store/notes.txt", Body=b"mine")
    kept = extract("--seed", "4", "--overwrite")
    assert kept.exit_code == 1 and "notes.txt" in kept.output, kept.output
    client.delete_object(Bucket=s3_bucket, Key="store/notes.txt")
    replaced = extract("--seed", "4", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    store = ImageFeatureStore.open(Location.parse(url, s3_server.storage_options))
    assert store.config.weights["seed"] == 4 and store.done_shards().all()
    # a prefix that holds anything else is never made a store
    client.put_object(Bucket=s3_bucket, Key="other/data.csv", Body=b"1,2")
    refused = run("extract", "images", small, "--cache", f"s3://{s3_bucket}/other", *IMAGE_ARGS,
                  "--scheduler", "synchronous", "--storage-options", options)
    assert refused.exit_code == 1 and "holds other files (data.csv)" in refused.output
    assert [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="other/")["Contents"]] \
        == ["other/data.csv"]


def test_a_second_writer_is_refused_on_s3(synth, s3_server, s3_bucket):
    location = Location.parse(f"s3://{s3_bucket}/locked", s3_server.storage_options)
    with writer_lock(location):
        result = run("extract", "images", synth, "--cache", location.url, *IMAGE_ARGS,
                     "--scheduler", "synchronous", "--storage-options",
                     json.dumps(s3_server.storage_options))
    assert result.exit_code == 1
    assert "another extraction is writing to this cache" in result.output
    assert f"pid {os.getpid()}" in result.output
    assert not location.exists()      # the refused run left nothing behind, nor did the lock


def test_a_cache_prefix_holding_the_images_is_refused(synth, s3_server, s3_bucket):
    url_manifest = _url_manifest(synth, s3_server, s3_bucket, "data/images")
    result = run("extract", "images", url_manifest, "--cache", f"s3://{s3_bucket}/data",
                 *IMAGE_ARGS, "--scheduler", "synchronous", "--storage-options",
                 json.dumps(s3_server.storage_options))
    assert result.exit_code == 1 and "holds images of the dataset" in result.output


# ---------------------------------------------------------------------- damage and repair
def test_lost_and_corrupt_objects_are_errors_and_repair_restores_the_bytes(synth, local, remote,
                                                                           s3_server):
    options = s3_server.storage_options
    url = copy_prefix(s3_server, remote, "images", "damaged")
    client = s3_server.client()
    client.delete_object(Bucket=remote, Key="damaged/visual/level2/c/1/0/0/0")    # shard 1
    key = "damaged/visual/level0/c/4/0/0/0"                                      # shard 4
    data = bytearray(client.get_object(Bucket=remote, Key=key)["Body"].read())
    data[len(data) // 3] ^= 0xFF
    client.put_object(Bucket=remote, Key=key, Body=bytes(data))
    location = Location.parse(url, options)
    with pytest.raises(CacheDamagedError) as lost:
        VisualBatchReader(location)
    assert url in str(lost.value) and "visual/level2" in str(lost.value)
    verify = run("cache", "verify", url, "--storage-options", json.dumps(options))
    assert verify.exit_code == 1
    assert "shard 1" in verify.output and "visual/level2/c/1/0/0/0" in verify.output
    assert "visual/level0 of image" in verify.output and "(row 8)" in verify.output
    repair = run("cache", "repair", url, "--storage-options", json.dumps(options))
    assert repair.exit_code == 0 and "2 damaged shards" in repair.output, repair.output
    again = run("extract", "images", synth, "--cache", url, *IMAGE_ARGS, "--scheduler",
                "synchronous", "--storage-options", json.dumps(options))
    assert again.exit_code == 0 and "(4 were done before)" in again.output, again.output
    assert_same_store(objects(local / "images"), objects(url, s3_server))


# ---------------------------------------------------------------------- images by URL
def _url_manifest(synth: Path, s3, bucket: str, prefix: str) -> Path:
    """The synthetic manifest with its images uploaded and named by s3:// URL."""
    upload(s3, synth.parent / "images", bucket, prefix)
    lines = []
    for line in synth.read_text().splitlines():
        record = json.loads(line)
        record["image"] = f"s3://{bucket}/{prefix}/{Path(record['image']).name}"
        lines.append(json.dumps(record))
    out = synth.parent / f"url-{bucket}.jsonl"
    out.write_text("\n".join(lines) + "\n")
    return out


def test_images_named_by_url_are_kept_validated_and_extracted(synth, local, s3_server, s3_bucket,
                                                               tmp_path):
    options = json.dumps(s3_server.storage_options)
    manifest = _url_manifest(synth, s3_server, s3_bucket, "images")
    first = json.loads(manifest.read_text().splitlines()[0])
    assert Record.from_json(first, root=str(tmp_path)).image == first["image"]   # not a path
    assert Record.from_json(first).to_json(root=str(tmp_path))["image"] == first["image"]
    valid = run("datasets", "validate", manifest, "--storage-options", options)
    assert valid.exit_code == 0 and "12 records, 0 bad" in valid.output, valid.output
    result = run("extract", "images", manifest, "--cache", tmp_path / "from-urls", *IMAGE_ARGS,
                 "--scheduler", "threads", "--storage-options", options)
    assert result.exit_code == 0, result.output
    # the same pixels as the local files, so the same features (the manifest itself differs)
    assert_same_store(objects(local / "images"), objects(tmp_path / "from-urls"), same_manifest=False)
    # a missing object and one that is not an image are found, as for files
    client = s3_server.client()
    client.delete_object(Bucket=s3_bucket, Key=f"images/{Path(first['image']).name}")
    second = json.loads(manifest.read_text().splitlines()[1])["image"]
    client.put_object(Bucket=s3_bucket, Key=second.split("/", 3)[3], Body=b"not an image")
    invalid = run("datasets", "validate", manifest, "--storage-options", options)
    assert invalid.exit_code == 1
    assert f"{first['image']}: file not found" in invalid.output
    assert f"{second}: not an image format" in invalid.output


def test_an_unreachable_image_store_is_refused_before_any_work(synth, s3_server, s3_bucket, tmp_path):
    manifest = _url_manifest(synth, s3_server, s3_bucket, "imgs")
    wrong = {**s3_server.storage_options, "endpoint_url": "http://127.0.0.1:9"}
    result = run("extract", "images", manifest, "--cache", tmp_path / "c", *IMAGE_ARGS,
                 "--scheduler", "synchronous", "--storage-options", json.dumps(wrong))
    assert result.exit_code == 1 and "cannot be read" in result.output, result.output
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------- train and evaluate
def test_train_killed_resumed_and_evaluated_from_s3_equals_the_local_run(synth, local, remote,
                                                                         s3_server, tmp_path):
    import torch

    options = json.dumps(s3_server.storage_options)
    common = ["--epochs", "6", "--batch-size", "4", "--dim", "16", "--seed", "1"]
    here = run("train", "--images", local / "images", "--text", local / "text", "--out",
               tmp_path / "local-run", *common)
    assert here.exit_code == 0, here.output
    killed = tmp_path / "s3-run"
    process = subprocess.Popen(
        [sys.executable, "-m", "multigrounding", "train", "--images", f"s3://{remote}/images",
         "--text", f"s3://{remote}/text", "--out", str(killed), *common, "--storage-options",
         options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None and not (killed / "last.pt").exists():
        time.sleep(0.005)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    raw = (killed / "config.json").read_text()
    assert json.loads(raw)["images"] == f"s3://{remote}/images"     # a URL, kept as given
    assert "endpoint" not in raw and "testing" not in raw            # no storage options saved
    # --resume finds the stores with the options given again; without them it says so
    alone = run("train", "--resume", killed)
    assert alone.exit_code == 1 and "--storage-options again" in alone.output, alone.output
    resumed = run("train", "--resume", killed, "--storage-options", options)
    assert resumed.exit_code == 0, resumed.output
    want = torch.load(tmp_path / "local-run" / "last.pt", weights_only=True)
    got = torch.load(killed / "last.pt", weights_only=True)
    assert got["epoch"] == want["epoch"] == 6
    for name, tensor in want["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
    reports = {}
    for name, images, text in (("local", local / "images", local / "text"),
                               ("s3", f"s3://{remote}/images", f"s3://{remote}/text")):
        result = run("evaluate", tmp_path / "local-run", "--manifest", synth, "--images", images,
                     "--text", text, "--out", tmp_path / name, "--pictures", "2",
                     "--storage-options", options)
        assert result.exit_code == 0, result.output
        reports[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert reports["s3"]["pointing"] == reports["local"]["pointing"]
    assert reports["s3"]["retrieval"] == reports["local"]["retrieval"]
    assert reports["s3"]["images"] == f"s3://{remote}/images"


def test_training_reads_both_stores_once_through_one_chunk_cache(remote, s3_server):
    """PairedCaches gives the image and the text reader one chunk cache: after a first read, the
    same rows come from memory even with every chunk gone from the bucket (a reader without the
    cache then fails), so an epoch after the first fetches nothing from either store."""
    client = s3_server.client()
    bucket = s3_server.new_bucket("cached")
    for prefix in ("images", "text"):           # a copy of the read-only stores, to damage
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=remote, Prefix=prefix + "/"):
            for item in page.get("Contents", []):
                client.copy_object(Bucket=bucket, Key=item["Key"],
                                   CopySource={"Bucket": remote, "Key": item["Key"]})
    images, text = f"s3://{bucket}/images", f"s3://{bucket}/text"
    caches = PairedCaches(images, text, cache_bytes=10**8, storage_options=s3_server.storage_options)
    images_rows, text_rows = list(range(len(caches.visual))), list(range(len(caches.text)))
    first_visual, first_text = caches.visual.read(images_rows), caches.text.read(text_rows)
    chunks = [item["Key"] for prefix in ("images/visual/", "text/tokens/", "text/sentence/")
              for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
              for item in page.get("Contents", []) if "/c/" in item["Key"]]
    assert any(key.startswith("text/") for key in chunks) and any(key.startswith("images/") for key in chunks)
    for key in chunks:
        client.delete_object(Bucket=bucket, Key=key)
    for a, b in zip(first_visual, caches.visual.read(images_rows)):
        assert a.tobytes() == b.tobytes()
    for a, b in zip(first_text, caches.text.read(text_rows)):
        assert a.tobytes() == b.tobytes()
    with pytest.raises(CacheDamagedError):
        TextBatchReader(Location.parse(text, s3_server.storage_options)).read(text_rows)
