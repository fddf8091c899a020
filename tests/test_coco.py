import json
import tracemalloc

import pytest

from multigrounding.datasets.coco import read_coco
from multigrounding.datasets.problems import ProblemLog
from multigrounding.errors import DatasetError, DatasetNotFoundError


def coco_file(path, images, annotations):
    data = {"info": {"year": 2014}, "licenses": [], "images": images, "annotations": annotations}
    path.write_text(json.dumps(data))
    return path


def test_captions_are_grouped_per_image_in_image_order(tmp_path):
    images = [{"id": 9, "file_name": "COCO_val2014_9.jpg", "width": 640, "height": 480},
              {"id": 3, "file_name": "COCO_val2014_3.jpg", "width": 50, "height": 40}]
    annotations = [{"id": 1, "image_id": 3, "caption": "A dog  runs.\n"},
                   {"id": 2, "image_id": 9, "caption": "Two cats."},
                   {"id": 4, "image_id": 3, "caption": "a brown dog"}]
    path = coco_file(tmp_path / "captions_val2014.json", images, annotations)
    problems = ProblemLog()
    records = list(read_coco(path, tmp_path / "", problems=problems))
    assert [r.id for r in records] == ["9", "3"]
    assert records[1].captions == ["A dog runs.", "a brown dog"]
    assert records[0].image == str(tmp_path / "COCO_val2014_9.jpg")
    assert (records[0].width, records[0].height) == (640, 480)
    assert problems.count == 0


def test_bad_entries_are_reported_and_the_rest_read(tmp_path):
    images = [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"},
              {"id": 1, "file_name": "dup.jpg"}, {"file_name": "noid.jpg"}, {"id": 5}]
    annotations = [{"id": 10, "image_id": 1, "caption": "   "},
                   {"id": 11, "image_id": 1, "caption": "a cat"},
                   {"id": 12, "image_id": 77, "caption": "an orphan"}]
    path = coco_file(tmp_path / "c.json", images, annotations)
    problems = ProblemLog()
    records = list(read_coco(path, tmp_path, problems=problems))
    assert [r.id for r in records] == ["1"]
    found = {(p.where, p.field) for p in problems}
    assert found == {("image 1", "id"), ("images[3]", "id"), ("image 5", "file_name"),
                     ("caption 10", "caption"), ("caption 12", "image_id"), ("image 2", "annotations")}
    assert problems.skipped_records == 4  # dup, no id, no file name, no caption


def test_whole_file_problems_raise_naming_the_file(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="missing.json: COCO captions file not found"):
        list(read_coco(tmp_path / "missing.json", tmp_path, problems=ProblemLog()))
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [{"id": 1, "file_name": "a.jpg"}, ')
    with pytest.raises(DatasetError, match="broken.json: not a valid JSON COCO captions file"):
        list(read_coco(broken, tmp_path, problems=ProblemLog()))
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"images": [{"id": 1, "file_name": "caf\xe9.jpg"}], "annotations": []}')
    with pytest.raises(DatasetError, match="latin.json"):
        list(read_coco(latin, tmp_path, problems=ProblemLog()))
    with pytest.raises(DatasetNotFoundError, match="image folder"):
        list(read_coco(broken, tmp_path / "nope", problems=ProblemLog()))


def test_reading_streams_instead_of_loading_the_json(tmp_path):
    """Peak memory stays below what json.load of the same file needs (about 5x the file)."""
    n = 3000
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "width": 640, "height": 480,
               "license": 3, "coco_url": f"http://images.example/{i}.jpg", "date_captured": "2013"}
              for i in range(n)]
    annotations = [{"id": 10 * i + k, "image_id": i, "caption": f"a photo number {i} of thing {k}"}
                   for i in range(n) for k in range(5)]
    path = coco_file(tmp_path / "big.json", images, annotations)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_coco(path, tmp_path, problems=ProblemLog()))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        json.loads(path.read_text())
        _, peak_json = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    assert peak < 0.5 * peak_json, (peak, peak_json, size)
