"""The trainer end to end on synthetic features: learning, resumption, refusals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from multigrounding.cli import main
from multigrounding.datasets.synth import generate_synth
from multigrounding.heads.config import ConfigError, TrainConfig, lr_at
from multigrounding.pipeline.image_task import ImageExtraction, extract_images
from multigrounding.pipeline.text_task import TextExtraction, extract_text


def make_caches(root: Path, images: int, seed: int) -> dict:
    generate_synth(root / "data", images, seed=seed, size=96)
    manifest = root / "data" / "manifest.jsonl"
    extract_images(ImageExtraction(manifest, root / "images", scheduler="threads", shard_size=32))
    extract_text(TextExtraction(manifest, root / "text", scheduler="threads", shard_size=256))
    return {"manifest": manifest, "images": root / "images", "text": root / "text"}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-caches")
    return {"train": make_caches(root / "train", 64, seed=11), "val": make_caches(root / "val", 16, seed=12)}


def args(caches, out, *extra):
    return ["train", "--images", str(caches["train"]["images"]), "--text", str(caches["train"]["text"]),
            "--out", str(out), "--dim", "64", "--batch-size", "16", "--seed", "1", *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_batch_retrieval_rises_well_above_chance(caches, tmp_path):
    out = tmp_path / "run"
    val = caches["val"]
    result = CliRunner().invoke(main, args(caches, out, "--epochs", "12", "--lr", "3e-3",
                                           "--val-images", str(val["images"]), "--val-text", str(val["text"]),
                                           "--val-manifest", str(val["manifest"])))
    assert result.exit_code == 0, result.output
    rows = [r for r in metrics(out) if "loss" in r]
    assert len(rows) == 12 * 4
    first, last = rows[:4], rows[-4:]
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < 0.7 * mean(first, "loss")
    assert mean(last, "batch_retrieval_accuracy") > 4 / 16   # chance is 1/16
    for name in ("config.json", "last.pt", "best.pt", "loss.png"):
        assert (out / name).is_file(), name
    assert any("val_accuracy" in r for r in metrics(out))
    assert json.loads((out / "config.json").read_text())["dim"] == 64


def test_resume_after_kill_9_gives_the_same_weights(caches, tmp_path):
    clean = subprocess.run([sys.executable, "-m", "multigrounding",
                            *args(caches, tmp_path / "clean", "--epochs", "4")], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "multigrounding",
                                *args(caches, killed, "--epochs", "4")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None and not (killed / "last.pt").exists():
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    resumed = subprocess.run([sys.executable, "-m", "multigrounding", "train", "--resume", str(killed)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    want = torch.load(tmp_path / "clean" / "last.pt", weights_only=False)
    got = torch.load(killed / "last.pt", weights_only=False)
    assert got["epoch"] == want["epoch"] == 4
    for name, tensor in want["model"].items():
        assert torch.equal(tensor, got["model"][name]), name
    steps = [r["step"] for r in metrics(killed) if "loss" in r]
    assert steps == sorted(set(steps)) == list(range(1, 17))


def test_bad_runs_are_refused_with_a_message(caches, tmp_path):
    train, val = caches["train"], caches["val"]
    other = CliRunner().invoke(main, ["train", "--images", str(train["images"]), "--text", str(val["text"]),
                                      "--out", str(tmp_path / "r")])
    assert other.exit_code == 1 and "different manifests" in other.output
    missing = CliRunner().invoke(main, ["train", "--images", str(tmp_path / "nope"), "--text",
                                        str(train["text"]), "--out", str(tmp_path / "r")])
    assert missing.exit_code == 1 and "no cache store here" in missing.output
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"images": str(train["images"]), "text": str(train["text"]),
                                  "out": str(tmp_path / "r"), "learning_rate": 0.1}))
    unknown = CliRunner().invoke(main, ["train", "--config", str(config)])
    assert unknown.exit_code == 1 and "unknown key 'learning_rate'" in unknown.output
    resume = CliRunner().invoke(main, ["train", "--resume", str(tmp_path / "empty")])
    assert resume.exit_code == 1 and "not a run directory" in resume.output


def test_half_written_cache_is_refused(caches, tmp_path):
    import shutil

    from multigrounding.cache.image_store import ImageFeatureStore

    copy = tmp_path / "images"
    shutil.copytree(caches["train"]["images"], copy)
    ImageFeatureStore.open(copy, mode="r+").group["done"][0] = 0
    result = CliRunner().invoke(main, ["train", "--images", str(copy), "--text",
                                       str(caches["train"]["text"]), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "not extracted" in result.output


def test_learning_rate_schedule_halves_at_the_milestones():
    config = TrainConfig(images="i", text="t", out="o")
    assert [lr_at(config, e) for e in (0, 8, 9, 13, 14, 19)] == [1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4]
    scaled = TrainConfig(images="i", text="t", out="o", epochs=4)
    assert scaled.milestones() == [2, 3]
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        TrainConfig.from_dict({"images": "i", "text": "t", "out": "o", "epoch": 3})


def test_ctrl_c_saves_mid_epoch_and_resume_ends_the_same(caches, tmp_path):
    clean = subprocess.run([sys.executable, "-m", "multigrounding", *args(caches, tmp_path / "clean", "--epochs", "2")],
                           capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr
    run = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "multigrounding", *args(caches, run, "--epochs", "2")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if (run / "metrics.jsonl").exists() and len(metrics(run)) >= 2:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "Traceback" not in stderr
    saved = torch.load(run / "last.pt", weights_only=False)
    assert saved["epoch"] * 4 + saved["step_in_epoch"] == saved["step"] >= 2
    resumed = subprocess.run([sys.executable, "-m", "multigrounding", "train", "--resume", str(run)],
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    want = torch.load(tmp_path / "clean" / "last.pt", weights_only=False)["model"]
    got = torch.load(run / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(want[name], got[name]) for name in want)


@pytest.mark.parametrize("loss", ["multigrounding", "npair", "triplet-hard"])
def test_each_loss_learns_retrieval_above_chance_on_held_out_images(caches, tmp_path, loss):
    from multigrounding.evaluation.report import Evaluation, evaluate_run

    out = tmp_path / loss
    result = CliRunner().invoke(main, args(caches, out, "--epochs", "12", "--lr", "3e-3", "--loss", loss))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["loss"] == loss
    rows = [r for r in metrics(out) if "loss" in r]
    assert ("retrieval" in rows[0]) == (loss != "multigrounding")
    val = caches["val"]
    report = evaluate_run(Evaluation(out, val["manifest"], val["images"], val["text"], tmp_path / "report",
                                     pictures=0, checkpoint="last"))
    retrieval = report["retrieval"]
    chance = 100 / retrieval["images"]                 # 16 held-out images: R@1 moves in 6.25 steps
    assert retrieval["text_to_image"]["r1"] > 2 * chance, retrieval
    assert retrieval["image_to_text"]["r1"] > chance, retrieval
    images, captions = retrieval["images"], retrieval["captions"]
    # chance mean ranks: the own image among I; the best of an image's ~C/I captions among C
    assert retrieval["text_to_image"]["mean_rank"] < 0.85 * (images + 1) / 2, retrieval
    assert retrieval["image_to_text"]["mean_rank"] < 0.85 * (captions + 1) / (captions / images + 1), retrieval


def test_phrase_loss_trains_on_labelled_captions_and_needs_labels(caches, tmp_path):
    from multigrounding.datasets.phrase_labels import add_phrase_labels
    from multigrounding.evaluation.report import Evaluation, evaluate_run

    refused = CliRunner().invoke(main, args(caches, tmp_path / "refused", "--phrase-loss", "1"))
    assert refused.exit_code == 1 and "has no phrase labels" in refused.output

    # synthetic captions carry their phrases (Flickr30k style): entities without a parser
    manifest = tmp_path / "labelled.jsonl"
    summary = add_phrase_labels(caches["train"]["manifest"], manifest, model=None)
    assert summary.entities > summary.captions and summary.triples == 0
    extract_images(ImageExtraction(manifest, tmp_path / "images", scheduler="threads", shard_size=32))
    extract_text(TextExtraction(manifest, tmp_path / "text", scheduler="threads", shard_size=256))
    labelled = {"train": {"images": tmp_path / "images", "text": tmp_path / "text"}}
    out = tmp_path / "run"
    result = CliRunner().invoke(main, args(labelled, out, "--epochs", "12", "--lr", "3e-3",
                                           "--phrase-loss", "1", "--level-selection", "paper"))
    assert result.exit_code == 0, result.output
    rows = [r for r in metrics(out) if "loss" in r]
    first, last = rows[:4], rows[-4:]
    assert sum(r["phrase"] for r in last) < 0.8 * sum(r["phrase"] for r in first)
    for r in rows:   # the total is the main loss plus the weighted phrase term
        assert r["loss"] == pytest.approx(r["word"] + r["sentence"] + r["l2"] + r["phrase"], rel=1e-5)
    val = caches["val"]
    report = evaluate_run(Evaluation(out, val["manifest"], val["images"], val["text"], tmp_path / "report",
                                     pictures=0, checkpoint="last"))
    assert report["retrieval"]["text_to_image"]["r1"] > 2 * 100 / report["retrieval"]["images"]


def test_level_selection_recipes_train_log_their_term_and_resume_exactly(caches, tmp_path):
    """Every part through the CLI: the per-level and calibration terms are logged and summed into
    the loss; an interrupted run (its dropout draws and soft schedule mid-epoch) resumes to the
    same weights."""
    recipe = "aux+dropout+soft+calibrate+guide"
    help_text = CliRunner().invoke(main, ["train", "--help"]).output
    for option in ("--level-selection", "--level-aux-weight", "--level-dropout",
                   "--level-temperature", "--level-anneal", "--level-calibration", "--level-guide"):
        assert option in help_text
    out = tmp_path / "recipe"
    result = CliRunner().invoke(main, args(caches, out, "--epochs", "2", "--level-selection", recipe,
                                           "--level-aux-weight", "0.5", "--level-dropout", "0.3",
                                           "--level-calibration", "2", "--level-guide", "0.5"))
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    assert (saved["level_selection"], saved["level_aux_weight"], saved["level_dropout"],
            saved["level_calibration"], saved["level_guide"]) == (recipe, 0.5, 0.3, 2.0, 0.5)
    rows = [r for r in metrics(out) if "loss" in r]
    for r in rows:
        assert r["loss"] == pytest.approx(r["word"] + r["sentence"] + r["l2"] + 0.5 * r["level_aux"]
                                          + 2 * r["level_calibration"] + 0.5 * r["level_guide"], rel=1e-5)

    from multigrounding.heads.trainer import train

    config = TrainConfig.from_dict({**saved, "out": str(tmp_path / "interrupted")})

    def stop_at_step_3(row):
        if row["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config, progress=stop_at_step_3)
    train(config, resume=True)
    want = torch.load(out / "last.pt", weights_only=False)["model"]
    got = torch.load(tmp_path / "interrupted" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(want[name], got[name]) for name in want)

    bad = CliRunner().invoke(main, args(caches, tmp_path / "bad", "--level-selection", "aux+max"))
    assert bad.exit_code == 1 and "unknown part 'max'" in bad.output
