"""``reproduce``: recipes read and checked, ``--check`` on a data root, and a recipe run end to end
on small native-format datasets — killed between stages, rerun, finished — to results.md and
results.json with our figures beside the published ones."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import write_image
from multigrounding.cli import main
from multigrounding.errors import UnknownNameError
from multigrounding.reproduce.recipe import RecipeError, list_recipes, load_recipe
from multigrounding.reproduce.runner import needed_files
from test_coco import coco_file
from test_flickr30k import annotation_xml, boxed, unboxed, write_entry
from test_referit import ref
from test_visual_genome import image_data, region

ELMO = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "elmo"
REPO = Path(__file__).resolve().parents[1]
PAPER_ROWS = {"vgg16-elmo-coco", "vgg16-elmo-vg", "pnasnet-elmo-coco", "pnasnet-elmo-vg"}


# ----------------------------------------------------------------------------- a native data root

def make_data_root(root: Path) -> Path:
    """Every dataset a recipe reads, in its native layout, a few small images each."""
    # COCO train2014: 4 images with two captions each
    images, annotations = [], []
    colours = ["red", "blue", "green", "yellow", "white", "black", "brown", "grey"]
    things = ["dog", "car", "man", "boat", "cat", "bus", "horse", "kite"]
    for i in range(4):
        name = f"COCO_train2014_{i:012d}.jpg"
        write_image(root / "coco" / "train2014" / name, 64, 48, seed=i)
        images.append({"id": i, "file_name": name, "width": 64, "height": 48})
        annotations += [{"id": 100 + 2 * i, "image_id": i, "caption": f"a {colours[i]} {things[i]} on the road"},
                        {"id": 101 + 2 * i, "image_id": i, "caption": f"the {things[i]} is {colours[i]}"}]
    (root / "coco" / "annotations").mkdir(parents=True)
    coco_file(root / "coco" / "annotations" / "captions_train2014.json", images, annotations)

    # Flickr30k Entities: 2 val and 2 test images
    flickr = root / "flickr30k"
    for number, image_id in enumerate(["101", "102", "201", "202"]):
        write_entry(flickr, image_id,
                    "[/EN#1/people A man] in [/EN#2/clothing a red shirt] rides [/EN#3/animals a horse] .\n"
                    "[/EN#1/people The rider] waves at [/EN#4/scene the crowd] .\n",
                    annotation_xml(image_id, 80, 60, [boxed(["1"], (1, 1, 40, 60)),
                                                      boxed(["2"], (10, 10, 30, 30)),
                                                      boxed(["3"], (30, 20, 80, 60)),
                                                      unboxed("4", scene=True)]))
        write_image(flickr / "flickr30k-images" / f"{image_id}.jpg", 80, 60, seed=10 + number)
    (flickr / "train.txt").write_text("\n")
    (flickr / "val.txt").write_text("101\n102\n")
    (flickr / "test.txt").write_text("201\n202\n")

    # ReferIt (refclef): 2 test images, Hu et al.'s image lists
    referit = root / "referit"
    (referit / "refclef").mkdir(parents=True)
    refs = [ref(1, 25001, 1, 1, "test", "man on left", "the guy"),
            ref(2, 25001, 2, 2, "test", "sky"),
            ref(3, 25002, 3, 1, "test", "the whole picture")]
    with open(referit / "refclef" / "refs(berkeley).p", "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    instances = {
        "images": [{"id": i, "file_name": f"25/images/{i}.jpg", "width": 64, "height": 48}
                   for i in (25001, 25002)],
        "annotations": [{"id": 1, "image_id": 25001, "bbox": [0, 0, 30, 48], "category_id": 1},
                        {"id": 2, "image_id": 25001, "bbox": [0, 0, 64, 20], "category_id": 2},
                        {"id": 3, "image_id": 25002, "bbox": [0, 0, 64, 48], "category_id": 1}],
        "categories": [{"id": 1, "name": "man"}, {"id": 2, "name": "sky"}]}
    (referit / "refclef" / "instances.json").write_text(json.dumps(instances))
    for number, i in enumerate((25001, 25002)):
        write_image(referit / "saiapr_tc-12" / "25" / "images" / f"{i}.jpg", 64, 48, seed=20 + number)
    (referit / "imlists").mkdir()
    (referit / "imlists" / "referit_test_imlist.txt").write_text("25001\n25002\n")

    # Visual Genome: 2 test images (one in each image folder), the reference split
    vg = root / "visual_genome"
    write_image(vg / "VG_100K" / "1.jpg", 64, 48, seed=30)
    write_image(vg / "VG_100K_2" / "2.jpg", 64, 48, seed=31)
    regions = [{"id": 1, "regions": [region(11, 1, "a red car", 0, 0, 40, 30),
                                     region(12, 1, "the tree", 20, 10, 44, 38)]},
               {"id": 2, "regions": [region(21, 2, "a dog", 5, 5, 50, 40)]}]
    (vg / "region_descriptions.json").write_text(json.dumps(regions))
    (vg / "image_data.json").write_text(json.dumps([image_data(1, 64, 48, "VG_100K"),
                                                    image_data(2, 64, 48, "VG_100K_2")]))
    with open(vg / "data_splits.pickle", "wb") as handle:
        pickle.dump({"train": {3}, "test": {1, 2}}, handle, protocol=2)

    # the tiny ELMo under the real files' names
    (root / "elmo").mkdir()
    shutil.copy(ELMO / "options.json", root / "elmo" / "elmo_2x4096_512_2048cnn_2xhighway_options.json")
    shutil.copy(ELMO / "lm_weights.hdf5", root / "elmo" / "elmo_2x4096_512_2048cnn_2xhighway_weights.hdf5")
    return root


def small_recipe(path: Path) -> Path:
    """vgg16-elmo-coco copied and edited as a user would: random VGG16 weights, a synchronous
    scheduler, a tiny head and two epochs of two batches of two."""
    text = load_recipe("vgg16-elmo-coco").toml
    for old, new in [('weights = "imagenet"', 'weights = "random"\nscheduler = "synchronous"'),
                     ('encoder = "elmo"', 'encoder = "elmo"\nscheduler = "synchronous"'),
                     ("dim = 1024", "dim = 8"), ("epochs = 20", "epochs = 2"),
                     ("batch_size = 32", "batch_size = 2"), ("lr_milestones = [10, 15]", "lr_milestones = [2]"),
                     ("visual_widths = [1024, 1024, 1024]", "visual_widths = [8, 8, 8]"),
                     ("pictures = 24", "pictures = 2")]:
        assert old in text, old
        text = text.replace(old, new, 1)
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- recipes

def test_the_packaged_recipes_state_the_papers_rows():
    assert set(list_recipes()) == PAPER_ROWS | {"effnetlite0-minilm-coco"}
    published = {}
    for name in PAPER_ROWS:
        recipe = load_recipe(name)
        assert recipe.training == {"dim": 1024, "epochs": 20, "batch_size": 32, "lr": 0.001,
                                   "lr_milestones": [10, 15], "lr_factor": 0.5, "loss": "multigrounding",
                                   "loss_terms": "both", "heatmap": "relu", "gamma1": 5.0, "gamma2": 10.0,
                                   "weight_decay": 0.0005, "seed": 0, "level_selection": "paper",
                                   "visual_widths": [2048, 2048, 1024] if "pnasnet" in name else [1024] * 3}
        assert recipe.text["encoder"] == "elmo"
        assert recipe.train.key == ("coco-train2014" if name.endswith("coco") else "vg-train")
        assert [(t.data.key, t.mode, t.protocol) for t in recipe.tests] == [
            ("flickr30k-test", "sentence", "paper"), ("referit-test", "query", "paper"),
            ("vg-test", "query", "paper")]
        published[name] = [t.published.pointing for t in recipe.tests]
        assert all(t.published.source for t in recipe.tests)
    assert published == {"vgg16-elmo-coco": [61.66, 47.52, 47.94], "vgg16-elmo-vg": [60.08, 60.01, 48.76],
                         "pnasnet-elmo-coco": [69.2, 61.9, None], "pnasnet-elmo-vg": [None, None, None]}
    offline = load_recipe("effnetlite0-minilm-coco")
    assert (offline.images["backbone"], offline.text["encoder"]) == ("efficientnet_lite0", "hf:all-MiniLM-L6-v2")


@pytest.mark.parametrize("old, new, message", [
    ("epochs = 20", "epochs = 1.5", "[training] epochs: expected an integer >= 1, got the number 1.5"),
    ('backbone = "vgg16"', 'backbone = "vgg61"', "[images] backbone: unknown backbone 'vgg61'"),
    ('weights = "imagenet"', 'weights = "imagenet"\ncache = "x"', "[images] cache: set by the reproduction"),
    ("lr = 0.001", "lr = -1.0", "[training] lr: must be greater than 0"),
    ("lr = 0.001", "learning_rate = 0.001", "[training] unknown key 'learning_rate'"),
    ('protocol = "paper"', 'protocol = "wwb"', "[test[0]] protocol: 'wwb' is not one of paper, wwbl"),
    ("pointing = 61.66", 'pointing = "61.66"', "[test[0]] published.pointing: expected a percentage"),
    ('split = "val"', 'split = "dev"', "[validation] split: flickr30k has the splits train, val, test"),
    ("visual_widths = [1024, 1024, 1024]", "visual_widths = [1024, 512]", "[training] visual_widths ends with 512"),
    ("[train]", "[[train]]", "train must be a table"),
    ("title = ", "title = = ", "not valid TOML"),
])
def test_a_bad_edit_is_one_line_naming_the_file_and_key(tmp_path, old, new, message):
    path = tmp_path / "mine.toml"
    path.write_text(load_recipe("vgg16-elmo-coco").toml.replace(old, new, 1))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text
    result = CliRunner().invoke(main, ["reproduce", "show", str(path)])
    assert result.exit_code == 1 and message in result.output


def test_an_unknown_recipe_name_says_the_closest():
    with pytest.raises(UnknownNameError, match="Did you mean 'vgg16-elmo-coco'"):
        load_recipe("vgg16-elmo-cocoa")


def test_list_and_show():
    listed = CliRunner().invoke(main, ["reproduce", "list"])
    assert listed.exit_code == 0
    for name in PAPER_ROWS:
        assert f"{name}: " in listed.output
    shown = CliRunner().invoke(main, ["reproduce", "show", "vgg16-elmo-vg"])
    assert shown.exit_code == 0 and shown.output == load_recipe("vgg16-elmo-vg").toml
    assert "pointing = 48.76" in shown.output


# ----------------------------------------------------------------------------- --check

def test_check_names_the_missing_file_and_exits_1(tmp_path):
    root = make_data_root(tmp_path / "data")
    recipe = small_recipe(tmp_path / "small.toml")
    complete = CliRunner().invoke(main, ["reproduce", str(recipe), "--data", str(root), "--check"])
    assert complete.exit_code == 0, complete.output
    assert "everything is there" in complete.output and "MISSING" not in complete.output
    assert len(needed_files(load_recipe(recipe))) == 18
    (root / "referit" / "imlists" / "referit_test_imlist.txt").unlink()
    result = CliRunner().invoke(main, ["reproduce", str(recipe), "--data", str(root), "--check"])
    assert result.exit_code == 1
    missing = [line for line in result.output.splitlines() if "MISSING" in line]
    assert missing == ["  MISSING referit/imlists/referit_test_imlist.txt  Hu et al.'s ReferIt test "
                       "image list (for test referit-test)"]
    assert "natural-language-object-retrieval" in result.output and "1 of 18 missing" in result.output
    assert not (tmp_path / "work").exists()
    # a run refuses to start without it, naming it
    run = CliRunner().invoke(main, ["reproduce", str(recipe), "--data", str(root), "--work",
                                    str(tmp_path / "work")])
    assert run.exit_code == 1 and "referit_test_imlist.txt: not found" in run.output


# ----------------------------------------------------------------------------- end to end

def _environment() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _kill_at(args: list[str], marker: str, timeout: float = 240) -> list[str]:
    """Run the command line and SIGKILL it as soon as a line starting with ``marker`` appears."""
    process = subprocess.Popen([sys.executable, "-m", "multigrounding", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=_environment())
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(marker):
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.wait(timeout=timeout)
    assert process.returncode == -signal.SIGKILL, lines
    return lines


def test_a_recipe_runs_end_to_end_killed_and_resumed(tmp_path):
    root = make_data_root(tmp_path / "data")
    recipe = small_recipe(tmp_path / "small.toml")
    work = tmp_path / "work"
    args = ["reproduce", str(recipe), "--data", str(root), "--work", str(work), "--device", "cpu"]

    # 1. killed as training starts: the datasets are converted and the features extracted
    before = _kill_at(args, "[train]")
    assert any(line.startswith("[extract] coco-train2014 images: vgg16 (random)") for line in before)
    assert not (work / "results.json").exists()

    # 2. rerun: nothing converted or extracted again, the rest done
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    for key in ("coco-train2014", "flickr30k-val", "flickr30k-test", "referit-test", "vg-test"):
        assert f"[convert] {key}: done" in again.output
        assert f"[extract] {key} text: done" in again.output and f"[extract] {key} images: done" in again.output
    assert "[train] seed 0: 2 epochs" in again.output
    results = json.loads((work / "results.json").read_text())
    report = (work / "results.md").read_text()

    # 3. with a second seed (and the device left to the default): seed 0's run and reports are
    # reused, seed 1 trained and evaluated, and the results give the mean, the spread and each run
    third = CliRunner().invoke(main, args[:-2] + ["--seeds", "2"])
    assert third.exit_code == 0, third.output
    assert "[train] seed 0: done" in third.output and "[train] seed 1: 2 epochs" in third.output
    assert "4 steps run" in third.output     # train seed 1, evaluate it on the three test sets
    both = json.loads((work / "results.json").read_text())
    assert both["seeds"] == [0, 1]
    for one, two in zip(results["tests"], both["tests"]):
        runs = two["pointing"]["runs"]
        assert runs[0] == one["pointing"]["mean"] and len(runs) == 2
        assert (two["pointing"]["mean"], two["pointing"]["min"], two["pointing"]["max"]) == (
            pytest.approx(sum(runs) / 2), min(runs), max(runs))
        assert [r["seed"] for r in two["runs"]] == [0, 1]
    assert "2 runs (seeds 0, 1): ours is the mean [min..max]" in (work / "results.md").read_text()

    # results: ours beside the published figure for every test set, with the same phrases'
    # baselines, attention correctness, skips and the split files
    assert [(t["dataset"], t["published"]["pointing"]) for t in results["tests"]] == [
        ("flickr30k", 61.66), ("referit", 47.52), ("vg", 47.94)]
    metrics = {key: json.loads((work / "reports" / "seed0" / key / "metrics.json").read_text())
               for key in ("flickr30k-test", "referit-test", "vg-test")}
    for test, (key, m) in zip(results["tests"], metrics.items()):
        paper = m["protocols"]["paper"]
        assert test["pointing"]["mean"] == pytest.approx(100 * paper["accuracy"])
        assert test["difference"] == pytest.approx(test["pointing"]["mean"] - test["published"]["pointing"])
        assert test["center_baseline"] == pytest.approx(100 * paper["center_baseline"])
        assert test["random_baseline"] == pytest.approx(100 * paper["random_baseline"])
        assert test["scored"] == paper["scored"] > 0 and test["unit"] == "phrase"
        assert test["other_protocols"]["wwbl"]["mean"] == pytest.approx(100 * m["protocols"]["wwbl"]["accuracy"])
        assert f"| **{test['pointing']['mean']:.2f}** | {test['published']['pointing']:.2f} | " \
               f"{test['difference']:+.2f} |" in report
    flickr, referit, vg = results["tests"]
    # 2 images x (a man, a red shirt, a horse, the rider; the crowd is the scene)
    assert (flickr["scored"], flickr["skipped_by_reason"]) == (8, {"scene": 2})
    assert (referit["scored"], vg["scored"]) == (4, 3)
    assert metrics["flickr30k-test"]["mode"] == "sentence" and metrics["vg-test"]["mode"] == "query"
    assert flickr["split_files"] == [{"path": str(root / "flickr30k" / "test.txt"),
                                      "sha256": __import__("hashlib").sha256(b"201\n202\n").hexdigest()}]
    assert referit["split_files"][0]["path"] == str(root / "referit" / "imlists" / "referit_test_imlist.txt")
    assert vg["split_files"][0]["path"] == str(root / "visual_genome" / "data_splits.pickle")
    assert results["train"]["records"] == 4 and results["validation"]["records"] == 2
    assert "per phrase, any box, the paper's" in report
    assert (work / "runs" / "seed0" / "best.pt").is_file()      # selected on Flickr30k val
    assert flickr["runs"][0]["checkpoint"] == str(work / "runs" / "seed0" / "best.pt")
