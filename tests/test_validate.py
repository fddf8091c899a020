import json

from conftest import write_image, write_truncated_jpeg

from multigrounding.datasets.validate import validate_manifest


def row(rid, image, **extra):
    base = {"id": rid, "image": image, "captions": ["a red circle above a blue square"],
            "phrases": [{"text": "a red circle", "caption": 0, "start": 0, "boxes": [[1, 1, 10, 10]],
                         "category": "circle"},
                        {"text": "a blue square", "caption": 0, "start": 4, "boxes": [[20, 5, 30, 15]],
                         "category": "square"}]}
    base.update(extra)
    return base


def write_manifest_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_clean_manifest_is_counted(tmp_path):
    for name, mode in [("a.jpg", "RGB"), ("b.png", "L"), ("c.png", "RGBA"), ("d.tif", "CMYK")]:
        write_image(tmp_path / name, 64, 48, mode=mode)
    path = write_manifest_rows(tmp_path / "m.jsonl", [
        row("a", "a.jpg", width=64, height=48), row("b", "b.png"), row("c", "c.png"), row("d", "d.tif")])
    report = validate_manifest(path, jobs=2)
    assert report.ok and report.bad_records == 0
    assert (report.records, report.captions, report.phrases, report.boxes) == (4, 4, 8, 8)
    assert report.categories == {"circle": 4, "square": 4}


def test_every_kind_of_bad_record_is_reported_by_line(tmp_path):
    write_image(tmp_path / "ok.jpg", 64, 48)
    write_image(tmp_path / "small.jpg", 16, 16)
    write_truncated_jpeg(tmp_path / "cut.jpg")
    (tmp_path / "text.jpg").write_text("not an image")
    bad_box = row("5", "ok.jpg")
    bad_box["phrases"][0]["boxes"] = [[10, 1, 5, 10]]
    bad_words = row("6", "ok.jpg")
    bad_words["phrases"][1]["start"] = 3
    empty = row("7", "ok.jpg", captions=[""], phrases=[])
    rows = [row("1", "ok.jpg"), row("2", "missing.jpg"), row("3", "cut.jpg"), row("4", "text.jpg"),
            bad_box, bad_words, empty, row("1", "ok.jpg"), row("9", "small.jpg"),
            row("10", "ok.jpg", width=50)]
    path = write_manifest_rows(tmp_path / "m.jsonl", rows)
    with open(path, "a") as handle:
        handle.write("{broken\n")
    report = validate_manifest(path, jobs=2)
    found = {(p.where, p.field) for p in report.problems}
    assert found == {(2, "image"), (3, "image"), (4, "image"), (5, "phrases[0].boxes[0]"),
                     (6, "phrases[1].text"), (7, "captions[0]"), (8, "id"),
                     (9, "phrases[1].boxes[0]"), (10, "width"), (11, "(line)")}
    assert report.bad_records == 10 and report.records == 11 and not report.ok
    messages = {p.where: str(p) for p in report.problems}
    assert messages[2].startswith(f"{path}:2: image: ") and "file not found" in messages[2]
    assert "does not decode" in messages[3]
    assert "first on line 1" in messages[8]
    assert "x1 > width 16" in messages[9]


def test_without_image_checks_the_declared_size_is_used(tmp_path):
    path = write_manifest_rows(tmp_path / "m.jsonl", [row("1", "missing.jpg", width=20, height=20)])
    report = validate_manifest(path, check_images=False)
    assert [(p.where, p.field) for p in report.problems] == [(1, "phrases[1].boxes[0]")]
