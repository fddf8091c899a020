"""Trust: a hostile or clumsy user loses no data, runs no foreign code and meets no traceback.

``FAULTS`` is the table of the trust issue: each row arranges a mistake or a damage, runs one
command, and states the exit status, the line the user must read and what must still hold
afterwards (nothing lost, nothing half-written). Flows that take several commands (repair and
extract again, resume a copied run, a full disk then space freed) follow the table.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from multigrounding.cli import main
from multigrounding.datasets.synth import generate_synth
from multigrounding.heads.config import TrainConfig
from multigrounding.heads.trainer import train
from multigrounding.pipeline.image_task import ImageExtraction, extract_images
from multigrounding.pipeline.text_task import TextExtraction, extract_text

IMAGE_OPTIONS = ["--weights", "random", "--shard-size", "8", "--scheduler", "synchronous"]
TEXT_OPTIONS = ["--shard-size", "32", "--scheduler", "synchronous"]
TRAIN_OPTIONS = ["--dim", "16", "--batch-size", "8", "--epochs", "1"]


# ----------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small dataset, both caches and a trained run: what every row starts from (copied
    before anything is changed)."""
    root = tmp_path_factory.mktemp("faults")
    generate_synth(root / "data", 24, seed=5, size=96)
    manifest = root / "data" / "manifest.jsonl"
    extract_images(ImageExtraction(manifest, root / "images", weights="random", shard_size=8,
                                   scheduler="synchronous"))
    extract_text(TextExtraction(manifest, root / "text", shard_size=32, scheduler="synchronous"))
    train(TrainConfig(images=str(root / "images"), text=str(root / "text"), out=str(root / "run"),
                      epochs=1, batch_size=8, dim=16))
    return {"root": root, "data": root / "data", "manifest": manifest, "images": root / "images",
            "text": root / "text", "run": root / "run"}


@dataclass
class Env:
    """One row's sandbox: copies of the world's files, made on demand."""

    world: dict
    tmp: Path

    def copy(self, name: str) -> Path:
        target = self.tmp / name
        if not target.exists():
            shutil.copytree(self.world[name], target)
        return target

    @property
    def manifest(self) -> Path:
        return self.copy("data") / "manifest.jsonl"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and the sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(args, cwd: Path | None = None):
    with contextlib.chdir(cwd) if cwd else contextlib.nullcontext():
        return CliRunner().invoke(main, [str(a) for a in args])


def shard_file(store: Path, level: int = 2, shard: int = 1) -> Path:
    return store / "visual" / f"level{level}" / "c" / str(shard) / "0" / "0" / "0"


def flip_a_bit(path: Path, at: int = 200) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


class Pwn:
    """A pickle that writes a file when it is unpickled: what a crafted checkpoint does."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (exec, (f"open({str(self.sentinel)!r}, 'w').write('pwned')",))


def crafted_checkpoint(path: Path, sentinel: Path) -> Path:
    torch.save({"model": {}, "heads_config": Pwn(sentinel)}, path)
    return path


def legacy_checkpoint(world: dict, path: Path) -> Path:
    """A checkpoint as multigrounding wrote it before format 2: numpy's random state pickled."""
    state = torch.load(world["run"] / "last.pt", weights_only=True)
    state.pop("format"), state.pop("format_version")
    state["rng"] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": __import__("random").getstate()}
    torch.save(state, path)
    return path


def mount_tmpfs(path: Path, size: str, read_only: bool = False) -> Path:
    """A real small (or read-only) file system at ``path``; skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()})")
    return path


@pytest.fixture
def mounts():
    made = []

    def mount(path: Path, size: str = "4m", read_only: bool = False) -> Path:
        made.append(mount_tmpfs(path, size, read_only))
        return path
    yield mount
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def immutable():
    made = []

    def make(path: Path) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make a folder immutable here ({done.stderr.strip()})")
        made.append(path)
        return path
    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


# -------------------------------------------------------------------------------- the table

@dataclass
class Fault:
    name: str
    arrange: Callable[[Env], list]          # files set up; returns the command line
    code: int
    says: str
    holds: Callable[[Env, object], None] | None = None    # what must hold afterwards
    needs: str = ""                          # fixture the row needs: mounts, immutable
    report: bool = False                     # a report command (verify): its findings are the output


def unchanged(folder: Callable[[Env], Path]):
    """The row's folder is byte for byte what it was before the command (``env.before``)."""
    def check(env: Env, result) -> None:
        assert snapshot(folder(env)) == env.before
    return check


def unchanged_and_no_overwrite_hint(folder: Callable[[Env], Path]):
    def check(env: Env, result) -> None:
        unchanged(folder)(env, result)
        assert "--overwrite" not in result.output
    return check


def _overwrite_dataset(env):
    data = env.copy("data")
    env.before = snapshot(data)
    return ["extract", "images", data / "manifest.jsonl", "--cache", data, "--overwrite", *IMAGE_OPTIONS]


def _overwrite_other_files(env):
    folder = env.tmp / "notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    env.before = snapshot(folder)
    return ["extract", "images", env.manifest, "--cache", folder, "--overwrite", *IMAGE_OPTIONS]


def _overwrite_store_with_other_files(env):
    store = env.copy("images")
    (store / "notes.txt").write_text("my notes")
    env.before = snapshot(store)
    return ["extract", "images", env.manifest, "--cache", store, "--overwrite", "--weights", "random",
            "--seed", "9", "--shard-size", "8", "--scheduler", "synchronous"]


def _cache_holding_images(env):
    images = env.copy("data") / "images"
    env.before = snapshot(images)
    return ["extract", "images", env.manifest, "--cache", images, *IMAGE_OPTIONS]


def _other_kind(env):
    store = env.copy("images")
    env.before = snapshot(store)
    return ["extract", "text", env.manifest, "--cache", store, "--overwrite", *TEXT_OPTIONS]


def _missing_chunk(command):
    def arrange(env):
        store = env.copy("images")
        shard_file(store).unlink()
        return command(env, store)
    return arrange


def _bit_flip(command):
    def arrange(env):
        store = env.copy("images")
        flip_a_bit(shard_file(store, level=1, shard=0))
        return command(env, store)
    return arrange


def _verify(env, store):
    return ["cache", "verify", store]


def _train(env, store):
    return ["train", "--images", store, "--text", env.world["text"], "--out", env.tmp / "r", *TRAIN_OPTIONS]


def _evaluate(env, store):
    return ["evaluate", env.world["run"], "--manifest", env.world["manifest"], "--images", store,
            "--text", env.world["text"], "--out", env.tmp / "report", "--no-retrieval"]


def _crafted(command):
    def arrange(env):
        env.sentinel = env.tmp / "pwned.txt"
        run = env.copy("run")
        crafted_checkpoint(run / "last.pt", env.sentinel)
        crafted_checkpoint(run / "best.pt", env.sentinel)
        return command(env, run)
    return arrange


def _not_pwned(env, _):
    assert not env.sentinel.exists(), "the crafted checkpoint ran its code"


def _config(text: str | bytes, *extra):
    def arrange(env):
        path = env.tmp / "config.json"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return ["train", "--config", path, *extra]
    return arrange


def _good_config(env) -> dict:
    return {"images": str(env.world["images"]), "text": str(env.world["text"]),
            "out": str(env.tmp / "r"), "dim": 16, "batch_size": 8, "epochs": 1}


def _config_with(**changes):
    def arrange(env):
        path = env.tmp / "config.json"
        path.write_text(json.dumps({**_good_config(env), **changes}))
        return ["train", "--config", path]
    return arrange


def _train_option(*options):
    def arrange(env):
        return ["train", "--images", env.world["images"], "--text", env.world["text"], "--out",
                env.tmp / "r", *TRAIN_OPTIONS, *options]
    return arrange


def _out_under_a_file(env):
    (env.tmp / "file").write_text("x")
    return ["train", "--images", env.world["images"], "--text", env.world["text"], "--out",
            env.tmp / "file" / "run", *TRAIN_OPTIONS]


def _cache_under_a_file(env):
    (env.tmp / "file").write_text("x")
    return ["extract", "images", env.manifest, "--cache", env.tmp / "file" / "c", *IMAGE_OPTIONS]


def _read_only(kind):
    def arrange(env):
        place = env.mounts(env.tmp / "ro", "1m", read_only=True)
        if kind == "out":
            return ["train", "--images", env.world["images"], "--text", env.world["text"], "--out",
                    place / "run", *TRAIN_OPTIONS]
        return ["extract", "images", env.manifest, "--cache", place / "c", *IMAGE_OPTIONS]
    return arrange


def _immutable(kind):
    def arrange(env):
        place = env.immutable(env.tmp / "frozen")
        if kind == "out":
            return ["train", "--images", env.world["images"], "--text", env.world["text"], "--out",
                    place, *TRAIN_OPTIONS]
        return ["extract", "images", env.manifest, "--cache", place, *IMAGE_OPTIONS]
    return arrange


def _ground(make_image):
    def arrange(env):
        image = make_image(env.tmp)
        return ["ground", env.world["run"], image, "a red circle", "--out", env.tmp / "g.png"]
    return arrange


def _zero_byte(tmp):
    (tmp / "empty.jpg").write_bytes(b"")
    return tmp / "empty.jpg"


def _text_as_jpg(tmp):
    (tmp / "notes.jpg").write_text("not a picture at all\n")
    return tmp / "notes.jpg"


def _bomb(tmp):
    """A PNG that is small on disk and 256 million pixels decoded."""
    path = tmp / "bomb.png"
    Image.new("1", (16000, 16000)).save(path)
    return path


def _resume_from(damage):
    def arrange(env):
        run = env.copy("run")
        damage(run / "last.pt")
        return ["train", "--resume", run]
    return arrange


def _long_caption(env):
    path = env.tmp / "long.jsonl"
    rows = [json.loads(line) for line in env.world["manifest"].read_text().splitlines()[:3]]
    rows[1]["captions"] = [" ".join(["word"] * 600)]
    for row in rows:
        row["image"] = str(env.world["data"] / row["image"])
        row["phrases"] = []
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["extract", "text", path, "--cache", env.tmp / "t", "--max-words", "1000", *TEXT_OPTIONS]


def _manifest_text(text: bytes, *command):
    """Write a manifest of ``text`` beside the dataset; ``M`` in ``command`` stands for it."""
    def arrange(env):
        path = env.copy("data") / "other.jsonl"
        path.write_bytes(text)
        return [path if c == "M" else env.tmp / "c" if c == "CACHE" else c for c in command]
    return arrange


def _bom_manifest(*command):
    def arrange(env):
        data = env.copy("data")
        path = data / "bom.jsonl"
        path.write_bytes(b"\xef\xbb\xbf" + (data / "manifest.jsonl").read_bytes())
        return [c if c != "M" else path for c in command]
    return arrange


def _all_records_kept(env, result):
    written = env.tmp / "converted.jsonl"
    assert len(written.read_text().splitlines()) == 24


FAULTS = [
    # data loss
    Fault("overwrite never deletes the dataset's folder", _overwrite_dataset, 1,
          "holds the dataset itself", unchanged(lambda e: e.tmp / "data")),
    Fault("overwrite never deletes a folder of other files", _overwrite_other_files, 1,
          "holds other files", unchanged(lambda e: e.tmp / "notes")),
    Fault("overwrite never deletes files beside a store", _overwrite_store_with_other_files, 1,
          "also holds notes.txt", unchanged(lambda e: e.tmp / "images")),
    Fault("a cache is never put among the dataset's images", _cache_holding_images, 1,
          "holds images of the dataset", unchanged(lambda e: e.tmp / "data" / "images")),
    Fault("a store of the other kind is named and kept", _other_kind, 1,
          "holds image features (efficientnet_lite0); text features go in their own store",
          unchanged_and_no_overwrite_hint(lambda e: e.tmp / "images")),
    Fault("verify finds a lost chunk file", _missing_chunk(_verify), 1, "data files are gone",
          report=True),
    Fault("train refuses a store with a lost chunk file", _missing_chunk(_train), 1,
          "finished shards lost data files"),
    Fault("evaluate refuses a store with a lost chunk file", _missing_chunk(_evaluate), 1,
          "finished shards lost data files"),
    Fault("verify finds a flipped bit", _bit_flip(_verify), 1, "Digest mismatch", report=True),
    Fault("train names the image of a flipped bit", _bit_flip(_train), 1,
          "visual/level1 of image synth-5-"),
    Fault("evaluate names the image of a flipped bit", _bit_flip(_evaluate), 1,
          "visual/level1 of image synth-5-"),
    # foreign code
    Fault("train --resume refuses a crafted checkpoint", _crafted(lambda e, run: ["train", "--resume", run]),
          1, "loading it could run code", _not_pwned),
    Fault("evaluate refuses a crafted checkpoint",
          _crafted(lambda e, run: ["evaluate", run, "--manifest", e.world["manifest"], "--images",
                                   e.world["images"], "--text", e.world["text"], "--out", e.tmp / "o",
                                   "--checkpoint", run / "last.pt"]),
          1, "loading it could run code", _not_pwned),
    Fault("ground refuses a crafted checkpoint",
          _crafted(lambda e, run: ["ground", run, e.world["data"] / "images" / "synth-5-000000.jpg",
                                   "a circle", "--out", e.tmp / "g.png"]),
          1, "loading it could run code", _not_pwned),
    Fault("an old checkpoint says how to convert it",
          lambda e: ["train", "--resume", _legacy_run(e)], 1, "convert-checkpoint"),
    # tracebacks where a message belongs
    Fault("--config: malformed JSON", _config("{\"epochs\": 2,"), 1, "not valid JSON"),
    Fault("--config: a JSON array", _config("[1, 2]"), 1, "a config is a JSON object"),
    Fault("--config: a missing file", lambda e: ["train", "--config", e.tmp / "nope.json"], 1,
          "no such config file"),
    Fault("--config: not UTF-8", _config(b"{\"epochs\": \"\xff\"}"), 1, "not UTF-8"),
    Fault("config: epochs 1.5", _config_with(epochs=1.5), 1, "epochs: expected an integer"),
    Fault("config: lr as a string", _config_with(lr="fast"), 1, "lr: expected a number"),
    Fault("config: a negative lr", _config_with(lr=-0.1), 1, "lr: must be greater than 0"),
    Fault("config: levels not a list", _config_with(levels="x"), 1, "levels: expected a list"),
    Fault("--lr negative", _train_option("--lr", "-1"), 2, "must be greater than 0"),
    Fault("--lr NaN", _train_option("--lr", "nan"), 2, "expected a finite number"),
    Fault("--levels x", _train_option("--levels", "x"), 2, "is not a list of integers"),
    Fault("--out under a file", _out_under_a_file, 1, "cannot create the run folder"),
    Fault("--cache under a file", _cache_under_a_file, 1, "cannot write a cache here"),
    Fault("--out on a read-only file system", _read_only("out"), 1, "Read-only file system",
          needs="mounts"),
    Fault("--cache on a read-only file system", _read_only("cache"), 1, "Read-only file system",
          needs="mounts"),
    Fault("--out an immutable folder", _immutable("out"), 1, "cannot write here", needs="immutable"),
    Fault("--cache an immutable folder", _immutable("cache"), 1, "cannot write a cache here",
          needs="immutable"),
    Fault("ground a 0-byte file", _ground(_zero_byte), 2, "empty.jpg: "),
    Fault("ground a text file named .jpg", _ground(_text_as_jpg), 2, "not an image format"),
    Fault("ground a decompression bomb", _ground(_bomb), 2, "too large to decode safely"),
    Fault("resume from a truncated last.pt",
          _resume_from(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])), 1,
          "damaged or not a checkpoint"),
    Fault("resume from an empty last.pt", _resume_from(lambda p: p.write_bytes(b"")), 1, "empty file"),
    Fault("--max-words above what the encoder takes", _long_caption, 1,
          "image synth-5-000001: captions[0]: 602 word pieces"),
    # quiet acceptance
    Fault("an empty manifest is refused by validate", _manifest_text(b"", "datasets", "validate", "M"),
          1, "the manifest is empty"),
    Fault("a blank-only manifest is refused by extract",
          _manifest_text(b"\n  \n\n", "extract", "images", "M", "--cache", "CACHE", *IMAGE_OPTIONS), 1,
          "the manifest is empty"),
    Fault("a manifest with a BOM validates", _bom_manifest("datasets", "validate", "M", "--no-images"),
          0, "24 records, 0 bad"),
    Fault("a manifest with a BOM converts every record",
          lambda e: _bom_manifest("datasets", "convert", "manifest", "M", "-o",
                                  e.tmp / "converted.jsonl")(e), 0, "wrote 24 records", _all_records_kept),
    Fault("a config with a BOM trains",
          lambda e: _config(b"\xef\xbb\xbf" + json.dumps(_good_config(e)).encode())(e), 0,
          "1 epochs"),
]


def _legacy_run(env) -> Path:
    run = env.copy("run")
    legacy_checkpoint(env.world, run / "last.pt")
    return run


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault(fault, world, tmp_path, request):
    env = Env(world, tmp_path)
    if fault.needs:
        setattr(env, fault.needs, request.getfixturevalue(fault.needs))
    args = fault.arrange(env)
    result = invoke(args)
    assert result.exit_code == fault.code, result.output
    assert fault.says in result.output, result.output
    assert "Traceback" not in result.output
    if fault.code and not fault.report:
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert len(errors) == 1, result.output          # one clear line
    if fault.holds is not None:
        fault.holds(env, result)


# ----------------------------------------------------------------------------- the flows

def test_the_crafted_checkpoint_would_act_if_loaded_unsafely(tmp_path):
    """The rows above are only meaningful if the crafted file really runs code when unpickled."""
    sentinel = tmp_path / "pwned.txt"
    torch.load(crafted_checkpoint(tmp_path / "x.pt", sentinel), weights_only=False)
    assert sentinel.read_text() == "pwned"


def test_repair_then_the_same_extract_gives_the_original_bytes(world, tmp_path):
    store = tmp_path / "images"
    shutil.copytree(world["images"], store)
    original = snapshot(store)
    shard_file(store).unlink()
    flip_a_bit(shard_file(store, level=0, shard=2))
    verify = invoke(["cache", "verify", store])
    assert verify.exit_code == 1 and "2 finished shards are damaged" in verify.output
    repaired = invoke(["cache", "repair", store])
    assert repaired.exit_code == 0 and "2 damaged shards marked" in repaired.output, repaired.output
    again = invoke(["extract", "images", world["manifest"], "--cache", store, *IMAGE_OPTIONS])
    assert again.exit_code == 0, again.output
    assert "1 were done before" in again.output      # only the two damaged shards were redone
    assert snapshot(store) == original


def test_a_missing_text_chunk_is_an_error_and_repairs(world, tmp_path):
    store = tmp_path / "text"
    shutil.copytree(world["text"], store)
    original = snapshot(store)
    (store / "sentence" / "c" / "0" / "0" / "0").unlink()
    result = invoke(["train", "--images", world["images"], "--text", store, "--out", tmp_path / "r",
                     *TRAIN_OPTIONS])
    assert result.exit_code == 1 and "sequence 0 (image synth-5-000000)" in result.output
    assert invoke(["cache", "repair", store]).exit_code == 0
    assert invoke(["extract", "text", world["manifest"], "--cache", store, *TEXT_OPTIONS]).exit_code == 0
    assert snapshot(store) == original


def test_a_second_train_into_the_same_folder_is_refused(world, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "multigrounding", "train", "--images",
                              str(world["images"]), "--text", str(world["text"]), "--out", str(run),
                              "--dim", "16", "--batch-size", "8", "--epochs", "200"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "metrics.jsonl").is_file() and time.time() < deadline:
            time.sleep(0.2)
        assert (run / "metrics.jsonl").is_file(), "the first run did not start"
        config = (run / "config.json").read_bytes()
        second = invoke(["train", "--images", world["images"], "--text", world["text"], "--out", run,
                         *TRAIN_OPTIONS])
        assert second.exit_code == 1 and "another training run is writing" in second.output
        resume = invoke(["train", "--resume", run])
        assert resume.exit_code == 1 and "another training run is writing" in resume.output
        assert (run / "config.json").read_bytes() == config
    finally:
        first.kill()
        first.wait()


def test_resume_works_on_the_copy_from_any_folder_and_leaves_the_original(world, tmp_path):
    original = tmp_path / "project" / "runs" / "a"
    (tmp_path / "project").mkdir()
    shutil.copytree(world["images"], tmp_path / "project" / "images")
    shutil.copytree(world["text"], tmp_path / "project" / "text")

    def stop_after_two_steps(metrics):
        if metrics["step"] == 2:
            raise KeyboardInterrupt
    with contextlib.chdir(tmp_path / "project"), pytest.raises(KeyboardInterrupt):
        train(TrainConfig(images="images", text="text", out="runs/a", epochs=2, batch_size=8, dim=16),
              progress=stop_after_two_steps)
    kept = snapshot(original)
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(original, copy)
    result = invoke(["train", "--resume", copy], cwd=tmp_path)      # another working directory
    assert result.exit_code == 0, result.output
    assert snapshot(original) == kept                                 # the original is untouched
    assert json.loads((copy / "config.json").read_text())["out"] == str(original.resolve())
    # the whole project moved (run and caches together): found from the run's new place
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "project", moved)
    shutil.rmtree(tmp_path / "project")
    (moved / "runs" / "a" / "last.pt").unlink()                       # so that it has work to do
    result = invoke(["train", "--resume", moved / "runs" / "a"], cwd=tmp_path)
    assert result.exit_code == 0, result.output
    shutil.rmtree(moved / "images")
    result = invoke(["train", "--resume", moved / "runs" / "a"], cwd=tmp_path)
    assert result.exit_code == 1
    assert str(original.parents[1].resolve() / "images") in result.output   # the paths tried
    assert str(moved / "images") in result.output


def test_an_old_checkpoint_converts_with_trust_and_then_resumes(world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(world["run"], run)
    legacy_checkpoint(world, run / "last.pt")
    refused = invoke(["convert-checkpoint", run / "last.pt"])
    assert refused.exit_code == 2 and "--trust" in refused.output
    converted = invoke(["convert-checkpoint", run / "last.pt", "--trust"])
    assert converted.exit_code == 0, converted.output
    result = invoke(["evaluate", run, "--manifest", world["manifest"], "--images", world["images"],
                     "--text", world["text"], "--out", tmp_path / "report", "--no-retrieval",
                     "--checkpoint", "last"])
    assert result.exit_code == 0, result.output


def test_ctrl_c_during_extract_says_one_line_and_the_rerun_resumes(world, tmp_path):
    store = tmp_path / "c"
    command = [sys.executable, "-m", "multigrounding", "extract", "images", str(world["manifest"]),
               "--cache", str(store), "--weights", "random", "--shard-size", "2", "--scheduler",
               "synchronous"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (store / "done" / "c" / "0").exists():
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 1, err
    assert "Traceback" not in err
    assert "interrupted" in err and "run the same command again to resume" in err
    rerun = subprocess.run(command, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    import zarr
    a, b = zarr.open_group(str(store), mode="r"), zarr.open_group(str(world["images"]), mode="r")
    for k in range(4):    # the same numbers as the world's store (sharded otherwise)
        assert np.array_equal(a[f"visual/level{k}"][:], b[f"visual/level{k}"][:])


# ------------------------------------------------------------------------------- disk full

def test_disk_full_during_shard_writes_then_space_freed(world, tmp_path, mounts):
    disk = mounts(tmp_path / "disk", "1m")
    store = disk / "c"
    command = ["extract", "images", world["manifest"], "--cache", store, *IMAGE_OPTIONS]
    full = invoke(command)
    assert full.exit_code == 1, full.output
    assert "the disk is full" in full.output and "Traceback" not in full.output
    assert not list(store.rglob("*.partial"))                       # nothing half-written
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    again = invoke(command)
    assert again.exit_code == 0, again.output
    assert snapshot(store / "visual") == snapshot(world["images"] / "visual")   # byte-identical


def test_disk_full_during_a_checkpoint_write_then_resume(world, tmp_path, mounts):
    clean = tmp_path / "clean"
    train(TrainConfig(images=str(world["images"]), text=str(world["text"]), out=str(clean), epochs=2,
                      batch_size=8, dim=16, seed=3))
    disk = mounts(tmp_path / "disk", "2m")
    run = disk / "run"
    filler = disk / "filler"
    args = ["train", "--images", world["images"], "--text", world["text"], "--out", run, "--dim", "16",
            "--batch-size", "8", "--epochs", "2", "--seed", "3"]
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler.write_bytes(b"\0" * (free - 120_000))            # room for the config, not a checkpoint
    full = invoke(args)
    assert full.exit_code == 1, full.output
    assert "cannot write" in full.output and "last.pt" in full.output and "--resume" in full.output
    assert not list(run.glob("*.partial")) and not (run / "last.pt").exists()
    filler.unlink()
    resumed = invoke(["train", "--resume", run])
    assert resumed.exit_code == 0, resumed.output
    a = torch.load(run / "last.pt", weights_only=True)["model"]
    b = torch.load(clean / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_during_a_manifest_write_then_space_freed(world, tmp_path, mounts):
    disk = mounts(tmp_path / "disk", "64k")
    out = disk / "m.jsonl"
    big = tmp_path / "big.jsonl"          # 480 records of about a kilobyte: more than the disk holds
    rows = [json.loads(line) for line in world["manifest"].read_text().splitlines()]
    copies = []
    for i in range(20):
        for row in rows:
            copies.append({**row, "id": f"{i}-{row['id']}", "image": str(world["data"] / row["image"])})
    big.write_text("".join(json.dumps(r) + "\n" for r in copies), encoding="utf-8")
    command = ["datasets", "convert", "manifest", big, "-o", out]
    full = invoke(command)
    assert full.exit_code == 1, full.output
    assert "no space left" in full.output and "Traceback" not in full.output
    assert not out.exists() and not list(disk.glob("*.partial"))
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    again = invoke(command)
    assert again.exit_code == 0, again.output
    reference = tmp_path / "reference" / "m.jsonl"     # at the same depth: same relative paths
    assert invoke(["datasets", "convert", "manifest", big, "-o", reference]).exit_code == 0
    assert out.read_bytes() == reference.read_bytes()
