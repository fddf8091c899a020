"""``evaluate`` and ``ground`` end to end on a small trained run, and their refusals."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from multigrounding.cli import main
from multigrounding.datasets.manifest import read_manifest, write_manifest
from multigrounding.datasets.records import Phrase
from multigrounding.datasets.synth import generate_synth
from multigrounding.evaluation.heatmap_metrics import box_mask, skip_reason
from multigrounding.heads.config import TrainConfig
from multigrounding.heads.level_selection import level_choice
from multigrounding.heads.trainer import train
from multigrounding.pipeline.image_task import ImageExtraction, extract_images
from multigrounding.pipeline.text_task import TextExtraction, extract_text

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-39769"


def make_caches(root: Path, images: int, seed: int, weights_seed: int = 0) -> dict:
    generate_synth(root / "data", images, seed=seed, size=96)
    manifest = root / "data" / "manifest.jsonl"
    extract_images(ImageExtraction(manifest, root / "images", weights="random", seed=weights_seed,
                                   scheduler="synchronous", shard_size=32))
    extract_text(TextExtraction(manifest, root / "text", scheduler="synchronous", shard_size=256))
    return {"manifest": manifest, "images": root / "images", "text": root / "text"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    caches = {"train": make_caches(root / "train", 32, seed=21), "test": make_caches(root / "test", 12, seed=22)}
    run = root / "run"
    train(TrainConfig(images=str(caches["train"]["images"]), text=str(caches["train"]["text"]),
                      out=str(run), epochs=1, batch_size=16, dim=16))
    return {"root": root, "run": run, **caches}


def evaluate_args(setup, out, manifest=None, images=None, *extra):
    test = setup["test"]
    return ["evaluate", str(setup["run"]), "--manifest", str(manifest or test["manifest"]),
            "--images", str(images or test["images"]), "--text", str(test["text"]), "--out", str(out), *extra]


def test_evaluate_writes_metrics_report_and_pictures(setup, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(main, evaluate_args(setup, out, None, None, "--pictures", "6"))
    assert result.exit_code == 0, result.output
    assert "pointing accuracy" in result.output and "report.md" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    p = metrics["pointing"]

    # every test phrase exactly once: scored or skipped; the baselines computed independently
    records = list(read_manifest(setup["test"]["manifest"]))
    scored = [(r, ph) for r in records for ph in r.phrases if not skip_reason(ph, r.width, r.height)]
    assert p["hits"] + p["misses"] == len(scored) > 0
    assert p["skipped"] == sum(len(r.phrases) for r in records) - len(scored)
    center = np.mean([box_mask(ph.boxes, r.width, r.height)[r.height // 2, r.width // 2] for r, ph in scored])
    random = np.mean([box_mask(ph.boxes, r.width, r.height).mean() for r, ph in scored])
    assert p["center_baseline"] == pytest.approx(center)
    assert p["random_baseline"] == pytest.approx(random)
    assert p["accuracy"] == pytest.approx(p["hits"] / len(scored))
    assert sum(c["phrases"] for c in p["per_category"].values()) == len(scored)
    for rates in [p["level_selection"]["phrases"], p["level_selection"]["sentences"],
                  *p["level_selection"]["per_category"].values()]:
        assert list(rates) == ["stage4", "stage6", "stage8", "head"]
        assert sum(rates.values()) == pytest.approx(1.0)
    # level-selection entropy (bits) of those rates, and the accuracy of the phrases choosing each level
    levels = p["level_selection"]
    for rates, entropy in [(levels["phrases"], levels["entropy_bits"]["phrases"]),
                           (levels["sentences"], levels["entropy_bits"]["sentences"]),
                           *[(levels["per_category"][c], levels["entropy_bits"]["per_category"][c])
                             for c in levels["per_category"]]]:
        assert entropy == pytest.approx(-sum(r * np.log2(r) for r in rates.values() if r > 0))
        assert 0 <= entropy <= 2
    chosen = {name: levels["phrases"][name] * len(scored) for name in levels["phrases"]}
    assert sum(levels["accuracy"][name] * n for name, n in chosen.items() if n) == pytest.approx(p["hits"])
    assert all((levels["accuracy"][name] is None) == (n == 0) for name, n in chosen.items())
    for category, group in p["per_category"].items():
        per_level = levels["per_category_accuracy"][category]
        assert sum(per_level[name] * levels["per_category"][category][name] * group["phrases"]
                   for name in per_level if per_level[name] is not None) == pytest.approx(group["hits"])

    r = metrics["retrieval"]
    captions = sum(len(rec.captions) for rec in records)
    assert (r["captions"], r["images"]) == (captions, len(records))
    for direction in ("text_to_image", "image_to_text"):
        assert r[direction]["r1"] <= r[direction]["r5"] <= r[direction]["r10"] <= 100

    pictures = metrics["pictures"]
    assert len(pictures) == 6
    for picture in pictures:
        with Image.open(out / picture["file"]) as image:
            assert image.size == (96, 96)
    report = (out / "report.md").read_text()
    for heading in ("## Pointing game", "## Level selection", "## Retrieval", "## Pictures"):
        assert heading in report
    assert "| entropy |" in report and "Pointing accuracy of the phrases that chose each level" in report
    assert f"| {levels['entropy_bits']['phrases']:.2f} |" in report
    assert pictures[0]["file"] in report


def test_evaluate_refuses_a_run_without_checkpoint(setup, tmp_path):
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.json").write_text((setup["run"] / "config.json").read_text())
    args = evaluate_args(setup, tmp_path / "out")
    args[1] = str(empty)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "no checkpoint" in result.output and str(empty) in result.output


def test_evaluate_refuses_a_cache_of_another_model(setup, tmp_path):
    test = setup["test"]
    other = tmp_path / "other-images"
    extract_images(ImageExtraction(test["manifest"], other, weights="random", seed=5,
                                   scheduler="synchronous", shard_size=32))
    result = CliRunner().invoke(main, evaluate_args(setup, tmp_path / "out", None, other))
    assert result.exit_code == 1
    assert "another model" in result.output and "seed" in result.output


def test_evaluate_refuses_a_manifest_whose_ids_are_not_in_the_cache(setup, tmp_path):
    records = list(read_manifest(setup["test"]["manifest"]))
    records[0].id = "not-in-the-cache"
    manifest = tmp_path / "other.jsonl"
    write_manifest(records, manifest)
    result = CliRunner().invoke(main, evaluate_args(setup, tmp_path / "out", manifest))
    assert result.exit_code == 1
    assert "not-in-the-cache" in result.output


def test_ground_a_real_photo_with_a_random_weight_run(setup, tmp_path):
    photo = COCO / "000000039769.png"
    out = tmp_path / "ground.png"
    result = CliRunner().invoke(main, ["ground", str(setup["run"]), str(photo),
                                       "two cats sleeping on a pink blanket", "--phrase", "two cats",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    with Image.open(photo) as original, Image.open(out) as picture:
        assert picture.size == original.size
        width, height = original.size
    line = result.output.strip().splitlines()[0]
    assert line.startswith("phrase 'two cats': points at (")
    x, y = (int(v) for v in line.split("points at (")[1].split(")")[0].split(", "))
    assert 0 <= x < width and 0 <= y < height


def test_ground_without_phrase_grounds_the_sentence_and_every_word(setup, tmp_path):
    out = tmp_path / "g.png"
    sentence = "a red circle above a blue square"
    image = next(iter(read_manifest(setup["test"]["manifest"]))).image
    result = CliRunner().invoke(main, ["ground", str(setup["run"]), image, sentence, "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 + len(sentence.split())
    assert lines[0].startswith("sentence ") and lines[1].startswith("word 'a'")
    assert out.is_file() and (tmp_path / f"g-{len(sentence.split())}.png").is_file()


@pytest.mark.parametrize("image, sentence, extra, message", [
    ("missing.jpg", "a cat", [], "does not exist"),
    (None, "   ", [], "the sentence is empty"),
    (None, "a red circle", ["--phrase", "a dog"], "not in the sentence"),
])
def test_ground_usage_errors_exit_2(setup, tmp_path, image, sentence, extra, message):
    image = image and str(tmp_path / image) or str(COCO / "000000039769.png")
    result = CliRunner().invoke(main, ["ground", str(setup["run"]), image, sentence,
                                       "--out", str(tmp_path / "x.png"), *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_query_mode_grounds_every_phrase_alone_and_needs_the_phrases_encoded_alone(setup, tmp_path):
    test = setup["test"]
    refused = CliRunner().invoke(main, evaluate_args(setup, tmp_path / "a", None, None, "--mode", "query"))
    assert refused.exit_code == 1 and "--phrases-alone" in refused.output

    text = tmp_path / "text-alone"
    extract_text(TextExtraction(test["manifest"], text, scheduler="synchronous", phrases_alone=True))
    args = evaluate_args(setup, tmp_path / "q", None, None, "--mode", "query", "--pictures", "0")
    args[args.index("--text") + 1] = str(text)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    query = json.loads((tmp_path / "q" / "metrics.json").read_text())["pointing"]
    sentence = CliRunner().invoke(main, evaluate_args(setup, tmp_path / "s", None, None, "--pictures", "0"))
    assert sentence.exit_code == 0, sentence.output
    words = json.loads((tmp_path / "s" / "metrics.json").read_text())["pointing"]
    # the same phrases are scored either way, grounded differently
    assert query["hits"] + query["misses"] == words["hits"] + words["misses"]
    assert query["center_baseline"] == words["center_baseline"]
    assert query["level_selection"]["phrases"] != words["level_selection"]["phrases"] or \
        query["attention_correctness"] != words["attention_correctness"]


def test_evaluate_refuses_a_manifest_size_that_differs_from_the_file(setup, tmp_path):
    records = list(read_manifest(setup["test"]["manifest"]))[:3]
    records[1].width = 97                       # the file is 96 wide
    manifest = tmp_path / "wrong-size.jsonl"
    write_manifest(records, manifest)
    extract_images(ImageExtraction(manifest, tmp_path / "images", weights="random", seed=0,
                                   scheduler="synchronous"))
    extract_text(TextExtraction(manifest, tmp_path / "text", scheduler="synchronous"))
    args = evaluate_args(setup, tmp_path / "out", manifest, tmp_path / "images")
    args[args.index("--text") + 1] = str(tmp_path / "text")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert f"image {records[1].id}: the manifest says 97x96" in result.output


def test_retrieval_folds_when_there_are_more_images_than_a_fold(setup, tmp_path):
    out = tmp_path / "folds"
    result = CliRunner().invoke(main, evaluate_args(setup, out, None, None, "--fold-size", "5",
                                                    "--pictures", "0"))
    assert result.exit_code == 0, result.output
    retrieval = json.loads((out / "metrics.json").read_text())["retrieval"]
    folds = retrieval["folds"]
    assert (folds["folds"], folds["images"], folds["dropped_images"]) == (2, 5, 2)
    assert folds["text_to_image"]["mean_rank"] <= 5 < retrieval["images"]
    assert "mean of 2 folds of 5 images" in (out / "report.md").read_text()


def test_a_run_on_one_fixed_level_reports_that_level(setup, tmp_path):
    train_caches = setup["train"]
    run = tmp_path / "level3"
    train(TrainConfig(images=str(train_caches["images"]), text=str(train_caches["text"]), out=str(run),
                      epochs=1, batch_size=16, dim=16, levels=[3]))
    args = evaluate_args(setup, tmp_path / "out", None, None, "--pictures", "2", "--no-retrieval")
    args[1] = str(run)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["pointing"]["level_selection"]["phrases"] == {"head": 1.0}
    assert "retrieval" not in metrics
    assert {p["level"] for p in metrics["pictures"]} == {"head"}


def entity_manifest(setup, folder: Path) -> Path:
    """Two test images with hand-made phrases whose counts differ between the protocols
    (images 96 x 96; "whole" covers the image, so any non-zero heatmap hits it):

    - chain 1, two mentions, the whole image: paper 2 phrases, wwbl 1 entity, all hits;
    - chain 2, a first box of 1 % and a second box: paper scores it, wwbl skips it (small);
    - chain 3, the scene: both skip it;
    - chain 4, two boxes with a gap at x 41-54: paper hits unless the point is in the gap, wwbl
      scores the union box, the whole image: a hit;
    - a standalone query, two boxes with a gap at y 41-54: likewise.
    """
    records = list(read_manifest(setup["test"]["manifest"]))
    chosen = [r for r in records if len(r.captions[0].split()) >= 6][:2]
    whole = [[0.0, 0.0, 95.0, 95.0]]
    first, second = chosen
    words = first.captions[0].split()

    def at(start, end, boxes, chain, **extra):
        return Phrase(" ".join(words[start:end]), boxes, caption=0, start=start, chain=chain, **extra)

    first.phrases = [at(0, 2, whole, "1", category="people"), at(2, 3, whole, "1", category="people"),
                     at(3, 4, [[0, 0, 9, 9], [10, 0, 95, 95]], "2"),
                     at(4, 5, [], "3", type="scene", category="scene"),
                     at(5, 6, [[0, 0, 40, 95], [55, 0, 95, 95]], "4")]
    second.phrases = [Phrase("the thing in the picture", [[0, 0, 95, 40], [0, 55, 95, 95]])]
    manifest = folder / "data" / "entities.jsonl"
    manifest.parent.mkdir(parents=True)
    write_manifest(chosen, manifest)
    return manifest, (first.id, words[5]), (second.id, second.phrases[0].text)


def test_evaluate_counts_the_same_groundings_under_both_protocols(setup, tmp_path):
    manifest, gap_x_phrase, gap_y_phrase = entity_manifest(setup, tmp_path)
    extract_images(ImageExtraction(manifest, tmp_path / "images", weights="random", seed=0,
                                   scheduler="synchronous", shard_size=32))
    extract_text(TextExtraction(manifest, tmp_path / "text", scheduler="synchronous"))
    outputs = {}
    for protocol in ("paper", "wwbl"):
        out = tmp_path / protocol
        result = CliRunner().invoke(main, ["evaluate", str(setup["run"]), "--manifest", str(manifest),
                                           "--images", str(tmp_path / "images"), "--text",
                                           str(tmp_path / "text"), "--out", str(out), "--protocol",
                                           protocol, "--pictures", "100", "--no-retrieval"])
        assert result.exit_code == 0, result.output
        headline = result.output.splitlines()[0]
        assert headline.startswith("pointing accuracy") and f"under protocol {protocol}" in headline
        outputs[protocol] = (json.loads((out / "metrics.json").read_text()),
                             (out / "report.md").read_text())
    paper_metrics, paper_report = outputs["paper"]
    wwbl_metrics, wwbl_report = outputs["wwbl"]
    assert (paper_metrics["protocol"], wwbl_metrics["protocol"]) == ("paper", "wwbl")
    # the same groundings: both runs hold the same counts, only the headline differs
    assert paper_metrics["protocols"] == wwbl_metrics["protocols"]
    paper, wwbl = paper_metrics["protocols"]["paper"], paper_metrics["protocols"]["wwbl"]

    # every scored phrase is drawn (--pictures 100): its point decides the paper's hit by hand
    points = {(p["image"], p["phrase"]): tuple(p["point"]) for p in paper_metrics["pictures"]}
    assert len(points) == 5
    x, y = points[gap_x_phrase][0], points[gap_y_phrase][1]
    expected_paper_hits = 3 + (not 41 <= x <= 54) + (not 41 <= y <= 54)
    assert (paper["unit"], paper["scored"], paper["hits"], paper["phrases"]) == (
        "phrase", 5, expected_paper_hits, 5)
    assert paper["skipped_by_reason"] == {"scene": 1}
    assert (wwbl["unit"], wwbl["scored"], wwbl["hits"], wwbl["phrases"]) == ("entity", 3, 3, 4)
    assert wwbl["skipped_by_reason"] == {"scene": 1, "small": 1}
    # the per-phrase details agree with the paper's count
    assert (paper_metrics["pointing"]["hits"], paper_metrics["pointing"]["misses"]) == (
        paper["hits"], paper["misses"])
    assert "**Protocol `paper` (per phrase, any box, the paper's)" in paper_report
    assert "Also counted under protocol `wwbl` (per entity, union box, WWbL NeurIPS 2022)" in paper_report
    assert "**Protocol `wwbl` (per entity, union box, WWbL NeurIPS 2022): 100.0 %**" in wwbl_report


def test_evaluate_and_ground_pick_levels_as_the_run_was_trained_unless_told(setup, tmp_path):
    trained = level_choice(TrainConfig(images="i", text="t", out="o").level_selection)
    other = {"focus": "relevance", "relevance": "focus"}[trained]
    for extra, want in (((), trained), (("--level-choice", other), other)):
        out = tmp_path / want
        args = evaluate_args(setup, out, None, None, "--pictures", "0", "--no-retrieval", *extra)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["level_choice"] == want
        said = {"focus": "whose heatmap is most focused", "relevance": "of highest relevance"}[want]
        assert f"Each word grounds with the level {said}" in (out / "report.md").read_text()
    photo = COCO / "000000039769.png"
    outputs = {}
    for choice in ("relevance", "focus"):
        result = CliRunner().invoke(main, ["ground", str(setup["run"]), str(photo),
                                           "two cats sleeping on a pink blanket", "--out",
                                           str(tmp_path / f"{choice}.png"), "--level-choice", choice])
        assert result.exit_code == 0, result.output
        outputs[choice] = result.output
    assert outputs["relevance"] != outputs["focus"], "every word and the sentence chose alike"
