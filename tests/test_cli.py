import json
import subprocess
import sys

from click.testing import CliRunner
from conftest import write_image

from multigrounding.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_help_lists_groups_and_each_command_teaches():
    result = run("--help")
    assert result.exit_code == 0 and "datasets" in result.output
    for command in ["convert", "validate", "synth"]:
        result = run("datasets", command, "--help")
        assert result.exit_code == 0
        assert "Example" in result.output
    assert "flickr30k ENTITIES_DIR IMAGE_DIR" in run("datasets", "convert", "--help").output


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "multigrounding", "--version"],
                         capture_output=True, text=True, check=True)
    assert "multigrounding" in out.stdout


def test_convert_coco_then_validate(tmp_path):
    write_image(tmp_path / "imgs" / "1.jpg", 40, 30)
    write_image(tmp_path / "imgs" / "2.jpg", 40, 30)
    captions = {"images": [{"id": 1, "file_name": "1.jpg", "width": 40, "height": 30},
                           {"id": 2, "file_name": "2.jpg"}, {"id": 3, "file_name": "3.jpg"}],
                "annotations": [{"id": 5, "image_id": i, "caption": "a photo"} for i in (1, 2, 3)]}
    (tmp_path / "cap.json").write_text(json.dumps(captions))
    out = tmp_path / "out" / "coco.jsonl"
    result = run("datasets", "convert", "coco", tmp_path / "cap.json", tmp_path / "imgs", "-o", out)
    assert result.exit_code == 0, result.output
    assert "wrote 2 records" in result.output and "skipped 1 records" in result.output
    assert "3.jpg:record 3: image: file not found" in result.output
    assert json.loads(out.read_text().splitlines()[0])["image"] == "../imgs/1.jpg"
    strict = run("datasets", "convert", "coco", tmp_path / "cap.json", tmp_path / "imgs", "-o", out, "--strict")
    assert strict.exit_code == 1
    result = run("datasets", "validate", out)
    assert result.exit_code == 0, result.output
    assert "2 records, 0 bad" in result.output and "captions 2" in result.output


def test_user_mistakes_give_one_line_errors_not_tracebacks(tmp_path):
    result = run("datasets", "convert", "cocoo", "a", "b", "-o", tmp_path / "x.jsonl")
    assert result.exit_code == 2 and "Did you mean 'coco'?" in result.output
    result = run("datasets", "convert", "coco", "a", "-o", tmp_path / "x.jsonl")
    assert result.exit_code == 2 and "CAPTIONS_JSON IMAGE_DIR" in result.output
    result = run("datasets", "convert", "coco", "a", "b", "--split", "test", "-o", tmp_path / "x.jsonl")
    assert result.exit_code == 2 and "--split does not apply" in result.output
    result = run("datasets", "convert", "coco", tmp_path / "nope.json", tmp_path, "-o", tmp_path / "x.jsonl")
    assert result.exit_code == 1 and "nope.json: COCO captions file not found" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.jsonl").exists()
    result = run("datasets", "validate", tmp_path / "missing.jsonl")
    assert result.exit_code == 1 and "manifest not found" in result.output


def test_validate_reports_bad_lines_and_exits_1(tmp_path):
    write_image(tmp_path / "a.jpg", 20, 20)
    rows = [{"id": "a", "image": "a.jpg", "captions": ["a dog"],
             "phrases": [{"text": "a cat", "caption": 0, "start": 0, "boxes": [[0, 0, 30, 5]]}]}]
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    result = run("datasets", "validate", path)
    assert result.exit_code == 1
    assert f"{path}:1: phrases[0].boxes[0]: " in result.output
    assert f"{path}:1: phrases[0].text: " in result.output


def test_synth_writes_a_dataset_that_validates(tmp_path):
    result = run("datasets", "synth", tmp_path / "s", "--images", 6, "--seed", 3, "--size", 96)
    assert result.exit_code == 0, result.output
    assert "wrote 6 images" in result.output
    result = run("datasets", "validate", tmp_path / "s" / "manifest.jsonl")
    assert result.exit_code == 0, result.output
    assert "6 records, 0 bad" in result.output


# The readers' own native-format fixtures, converted and validated through the command line.
from test_flickr30k import dataset  # noqa: E402,F401  (pytest fixtures)
from test_referit import referit  # noqa: E402,F401
from test_visual_genome import vg  # noqa: E402,F401


def convert_and_validate(tmp_path, *args):
    out = tmp_path / "out" / "m.jsonl"
    result = run("datasets", "convert", *args, "-o", out)
    assert result.exit_code == 0, result.output
    checked = run("datasets", "validate", out)
    assert checked.exit_code == 0, checked.output
    return result.output, [json.loads(line) for line in out.read_text().splitlines()]


def test_convert_flickr30k_test_split(tmp_path, dataset):
    root, images = dataset
    output, rows = convert_and_validate(tmp_path, "flickr30k", root, images, "--split", "test")
    assert [r["id"] for r in rows] == ["2000"]
    assert rows[0]["phrases"][0] == {"text": "A dog", "caption": 0, "start": 0,
                                     "boxes": [[0, 0, 63, 47]], "category": "animals", "chain": "5"}


def test_convert_visual_genome_with_the_reference_split(tmp_path, vg):
    output, rows = convert_and_validate(tmp_path, "vg", vg["regions"], vg["image_data"], vg["images"],
                                        vg["split_file"], "--split", "train")
    assert [r["id"] for r in rows] == ["1"]
    assert rows[0]["image"] == "../images/VG_100K_2/1.jpg"
    assert "clamped" in output  # clamps are reported, not silent


def test_convert_referit_with_hu_et_al_lists(tmp_path, referit):
    write_image(referit["images"] / "25" / "images" / "25008.jpg", 64, 48)
    output, rows = convert_and_validate(tmp_path, "referit", referit["refs"], referit["instances"],
                                        referit["images"], referit["splits"], "--split", "train")
    assert [r["id"] for r in rows] == ["25008"]
    assert "skipped 1 records" in output  # 25010: its only ref has no annotation
    assert all("caption" not in p for p in rows[0]["phrases"])  # standalone queries
