"""Extraction on a real dask cluster with no shared disk: a scheduler and two workers started
from dask's own command line on 127.0.0.1, images and cache in an object store (moto S3).

The workers see nothing of this machine's files: the manifest names its images by s3:// URL, and
each task carries the store's Location (URL and storage options) and the images' storage options.
A worker killed with SIGKILL mid-run has its shard rescheduled on the other; a client killed
mid-run is rerun and finishes only what is left. Every result is compared object by object with
a local synchronous extraction of the same manifest.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from multigrounding.cli import main
from multigrounding.datasets.synth import generate_synth

from dask_cluster import Cluster
from test_object_store_cache import assert_same_store, objects, upload

BACKBONE = ["--backbone", "efficientnet_lite0", "--weights", "random", "--seed", "3"]
ARGS = [*BACKBONE, "--shard-size", "2", "--batch-size", "2"]
IMAGES = 16                 # 8 shards: time enough to kill something in the middle


@pytest.fixture(autouse=True)
def no_aws_environment(monkeypatch):
    """No AWS settings of the user's; and no OMP_NUM_THREADS, so that every worker runs torch
    on this machine's cores as the local reference run does (the thread count changes the
    float arithmetic, so the bytes)."""
    for name in list(os.environ):
        if name.startswith("AWS_") or name == "OMP_NUM_THREADS":
            monkeypatch.delenv(name)


def done_count(s3, bucket: str, prefix: str) -> int:
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/done/c/")
    return listing.get("KeyCount", 0)


def wait_for_done(process: subprocess.Popen, s3, bucket: str, prefix: str, count: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None \
            and done_count(s3, bucket, prefix) < count:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    assert done_count(s3, bucket, prefix) >= count


@pytest.mark.slow
def test_a_cluster_extraction_survives_a_killed_worker_and_a_killed_client(tmp_path, s3_server,
                                                                           s3_bucket):
    generate_synth(tmp_path / "data", IMAGES, seed=7, size=64)
    upload(s3_server, tmp_path / "data" / "images", s3_bucket, "dataset/images")
    manifest = tmp_path / "manifest.jsonl"       # the workers read the images from the bucket
    lines = []
    for line in (tmp_path / "data" / "manifest.jsonl").read_text().splitlines():
        record = json.loads(line)
        record["image"] = f"s3://{s3_bucket}/dataset/images/{Path(record['image']).name}"
        lines.append(json.dumps(record))
    manifest.write_text("\n".join(lines) + "\n")
    options = json.dumps(s3_server.storage_options)

    local = CliRunner().invoke(main, ["extract", "images", str(manifest), "--cache",
                                      str(tmp_path / "local"), *ARGS, "--scheduler", "synchronous",
                                      "--storage-options", options])
    assert local.exit_code == 0, local.output
    want = objects(tmp_path / "local")

    cluster = Cluster(tmp_path).start()
    try:
        cluster.add_worker("w1")
        cluster.add_worker("w2")
        cluster.wait_for_workers(2)

        def client(prefix: str) -> list[str]:
            return [sys.executable, "-m", "multigrounding", "extract", "images", str(manifest),
                    "--cache", f"s3://{s3_bucket}/{prefix}", *ARGS, "--scheduler", cluster.address,
                    "--storage-options", options]

        # 1. a worker dies mid-run: its shard is run again on the other, the run finishes
        run = subprocess.Popen(client("cache-a"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        wait_for_done(run, s3_server, s3_bucket, "cache-a", 1)
        victim = cluster.workers()["w1"]
        busy = cluster.processing(victim)
        os.kill(cluster.processes["w1"].pid, signal.SIGKILL)
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        assert busy, "the killed worker had no shard in hand"
        assert "8/8 shards done" in stdout and "0 shards failed" in stdout, stdout
        assert_same_store(want, objects(f"s3://{s3_bucket}/cache-a", s3_server))

        # 2. the client dies mid-run (two workers again): the same command finishes the rest
        cluster.add_worker("w3")
        cluster.wait_for_workers(2)
        run = subprocess.Popen(client("cache-b"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        wait_for_done(run, s3_server, s3_bucket, "cache-b", 2)
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        killed_at = done_count(s3_server, s3_bucket, "cache-b")
        assert killed_at < 8
        again = subprocess.run(client("cache-b"), capture_output=True, text=True, timeout=600)
        assert again.returncode == 0, again.stderr
        assert "8/8 shards done" in again.stdout, again.stdout
        before = int(re.search(r"\((\d+) were done before\)", again.stdout).group(1))
        assert killed_at <= before < 8       # tasks already on the workers may have finished
        assert_same_store(want, objects(f"s3://{s3_bucket}/cache-b", s3_server))
    finally:
        cluster.stop()
