"""Visual extraction end to end: the store, resumption after kill -9, refusals, bad images."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_image, write_jsonl, write_truncated_jpeg
from PIL import Image

from multigrounding.cache.image_store import FAILED, OK, ImageFeatureStore
from multigrounding.cache.reader import VisualBatchReader
from multigrounding.cache.store import writer_lock
from multigrounding.cli import main
from multigrounding.datasets.synth import generate_synth

BACKBONE = ["--backbone", "efficientnet_lite0", "--weights", "random", "--seed", "3"]


def extract(manifest, cache, *extra):
    args = ["extract", "images", str(manifest), "--cache", str(cache), *BACKBONE,
            "--scheduler", "threads", "--shard-size", "4", "--batch-size", "2", *extra]
    return CliRunner().invoke(main, args)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, 10, seed=5, size=96)
    return root / "manifest.jsonl"


def arrays(path):
    store = ImageFeatureStore.open(path)
    out = {f"level{k}": level[:] for k, level in enumerate(store.levels)}
    out.update(status=store.status(), sizes=store.original_sizes(), done=store.group["done"][:])
    return out


def test_extract_writes_every_level_and_records_the_config(synth, tmp_path):
    result = extract(synth, tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "3/3 shards done" in result.output
    store = ImageFeatureStore.open(tmp_path / "cache")
    ids = [json.loads(line)["id"] for line in synth.read_text().splitlines()]
    assert list(store.ids) == ids
    assert (store.status() == OK).all() and store.done_shards().all()
    assert (store.original_sizes() == 96).all()
    spec_levels = store.config.levels
    for level, declared in zip(store.levels, spec_levels):
        assert level.shape == (10, store.grid, store.grid, declared.channels)
        values = level[:]
        assert values.dtype == np.float16 and np.isfinite(values).all() and values.any()
    assert store.config.weights["weights"] == "random"  # never passes for a real run
    assert store.config.weights["seed"] == 3
    # the batch reader returns the same rows, in the order asked
    rows = [7, 0, 3]
    batch = VisualBatchReader(tmp_path / "cache").read(rows)
    for level, values in zip(store.levels, batch):
        np.testing.assert_array_equal(values, level[:][rows])
    verify = CliRunner().invoke(main, ["cache", "verify", str(tmp_path / "cache")])
    assert verify.exit_code == 0 and "0 problems" in verify.output


def test_a_second_run_does_nothing_and_other_settings_are_refused(synth, tmp_path):
    assert extract(synth, tmp_path / "c").exit_code == 0
    again = extract(synth, tmp_path / "c")
    assert again.exit_code == 0 and "(3 were done before)" in again.output
    other = CliRunner().invoke(main, ["extract", "images", str(synth), "--cache", str(tmp_path / "c"),
                                      "--backbone", "efficientnet_lite0", "--weights", "random",
                                      "--seed", "4", "--scheduler", "threads", "--shard-size", "4"])
    assert other.exit_code == 1
    assert "made with other settings" in other.output and "weights.seed: 3 -> 4" in other.output
    assert "--overwrite" in other.output and "Traceback" not in other.output
    edited = tmp_path / "edited.jsonl"
    edited.write_text(synth.read_text().replace("a ", "the ", 1))
    changed = extract(edited, tmp_path / "c")
    assert changed.exit_code == 1 and "manifest.sha256" in changed.output
    replaced = extract(synth, tmp_path / "c", "--seed", "4", "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert ImageFeatureStore.open(tmp_path / "c").config.weights["seed"] == 4


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(synth, tmp_path):
    with writer_lock(tmp_path / "c"):
        result = extract(synth, tmp_path / "c")
    assert result.exit_code == 1
    assert "another extraction is writing to this cache" in result.output


def test_a_finished_store_needs_no_lock_but_any_other_work_does(synth, tmp_path):
    """Two identical extractions started side by side: once the store is finished the second has
    nothing to do and succeeds, lock or no lock; with work left, or other settings, it is
    refused while the lock is held."""
    assert extract(synth, tmp_path / "c").exit_code == 0
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*") if p.is_file()}
    with writer_lock(tmp_path / "c"):
        again = extract(synth, tmp_path / "c")
        other = extract(synth, tmp_path / "c", "--seed", "4", "--overwrite")
    assert again.exit_code == 0 and "(3 were done before)" in again.output, again.output
    assert other.exit_code == 1 and "another extraction is writing to this cache" in other.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "c").rglob("*") if p.is_file()
            and p.name != ".lock"} == {p: t for p, t in before.items() if p.name != ".lock"}
    chunk = next(p for p in (tmp_path / "c" / "visual" / "level0").rglob("*") if p.is_file()
                 and p.name != "zarr.json")
    chunk.unlink()                                     # damage, then forget it: work left
    repaired = CliRunner().invoke(main, ["cache", "repair", str(tmp_path / "c")])
    assert repaired.exit_code == 0 and "marked for extraction again" in repaired.output, repaired.output
    with writer_lock(tmp_path / "c"):
        refused = extract(synth, tmp_path / "c")
    assert refused.exit_code == 1 and "another extraction is writing" in refused.output


def test_bad_images_fail_alone_and_odd_formats_are_read(tmp_path):
    images = tmp_path / "images"
    write_image(images / "ok.jpg", 40, 30)
    write_image(images / "gray.png", 40, 30, mode="L")
    write_image(images / "cmyk.jpg", 40, 30, mode="CMYK")
    write_image(images / "alpha.png", 40, 30, mode="RGBA")
    write_image(images / "tiny.png", 1, 1)
    write_image(images / "huge.jpg", 5000, 4000)
    Image.fromarray((np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)).save(images / "deep.png")
    write_truncated_jpeg(images / "cut.jpg")
    (images / "text.jpg").write_text("not an image")
    names = ["ok.jpg", "missing.jpg", "gray.png", "cmyk.jpg", "cut.jpg", "alpha.png", "tiny.png",
             "deep.png", "text.jpg", "huge.jpg"]
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": n, "image": f"images/{n}", "captions": ["x"]}
                                                  for n in names])
    result = extract(manifest, tmp_path / "c")
    assert result.exit_code == 1, result.output
    assert "3 images failed" in result.output
    store = ImageFeatureStore.open(tmp_path / "c")
    failed = {image_id: reason for _, image_id, reason in store.failures()}
    assert set(failed) == {"missing.jpg", "cut.jpg", "text.jpg"}
    assert "file not found" in failed["missing.jpg"] and "does not decode" in failed["cut.jpg"]
    status = store.status()
    assert [names[i] for i in np.flatnonzero(status == FAILED)] == ["missing.jpg", "cut.jpg", "text.jpg"]
    for level in store.levels:
        assert not level[:][status == FAILED].any()           # masked rows are zeros
    assert store.levels[0][:][status == OK].reshape(7, -1).any(axis=1).all()
    assert tuple(store.original_sizes()[names.index("huge.jpg")]) == (5000, 4000)
    info = CliRunner().invoke(main, ["cache", "info", str(tmp_path / "c")])
    assert "failures (3)" in info.output and "cut.jpg" in info.output
    assert CliRunner().invoke(main, ["cache", "verify", str(tmp_path / "c")]).exit_code == 0


def test_kill_9_then_resume_gives_the_same_arrays_as_one_clean_run(tmp_path):
    generate_synth(tmp_path / "data", 24, seed=1, size=96)
    manifest = tmp_path / "data" / "manifest.jsonl"
    command = [sys.executable, "-m", "multigrounding", "extract", "images", str(manifest), *BACKBONE,
               "--scheduler", "synchronous", "--shard-size", "2", "--batch-size", "2"]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(command + ["--cache", str(clean)], check=True, capture_output=True)
    process = subprocess.Popen(command + ["--cache", str(killed)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    done_dir = killed / "done" / "c"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if done_dir.is_dir() and len(os.listdir(done_dir)) >= 3:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = len(os.listdir(done_dir))
    assert 3 <= finished_before < 12
    resumed = subprocess.run(command + ["--cache", str(killed)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({finished_before} were done before)" in resumed.stdout
    assert not list(Path(killed).rglob("*.partial"))
    want, got = arrays(clean), arrays(killed)
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].dtype == got[name].dtype
        assert want[name].tobytes() == got[name].tobytes(), name


@pytest.mark.parametrize("scheduler", ["processes", "distributed"])
def test_every_scheduler_writes_the_same_store(synth, tmp_path, scheduler):
    """The same graph on spawned processes and on a local dask.distributed cluster (the same
    torch threads per worker as the threaded run, so the float arithmetic is the same too)."""
    assert extract(synth, tmp_path / "threads", "--workers", "2").exit_code == 0
    result = extract(synth, tmp_path / scheduler, "--scheduler", scheduler, "--workers", "2")
    assert result.exit_code == 0, result.output
    want, got = arrays(tmp_path / "threads"), arrays(tmp_path / scheduler)
    for name in want:
        assert want[name].tobytes() == got[name].tobytes(), name
