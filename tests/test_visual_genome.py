"""Visual Genome region_descriptions.json + image_data.json (+ the reference split) → records."""
from __future__ import annotations

import json
import os
import pickle
import tracemalloc

import pytest

from conftest import write_image
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import check_record
from multigrounding.datasets.visual_genome import read_visual_genome
from multigrounding.errors import DatasetError, DatasetNotFoundError, UnsafePickleError

URL = "https://cs.stanford.edu/people/rak248/{}/{}.jpg"


def region(region_id, image_id, phrase, x, y, width, height):
    return {"region_id": region_id, "width": width, "height": height, "image_id": image_id,
            "phrase": phrase, "y": y, "x": x}


def image_data(image_id, width, height, folder="VG_100K"):
    return {"width": width, "url": URL.format(folder, image_id), "height": height,
            "image_id": image_id, "coco_id": None, "flickr_id": None}


@pytest.fixture
def vg(tmp_path):
    """Three images: 1 (in VG_100K_2 on disk), 2 (only as images/2.jpg), 3 (not in image_data)."""
    images = tmp_path / "images"
    write_image(images / "VG_100K_2" / "1.jpg", 64, 48)
    write_image(images / "2.jpg", 32, 32)
    regions = [
        {"id": 1, "regions": [
            region(11, 1, "a red car", 10, 5, 20, 10),
            region(12, 1, "the  tree ", 0, 0, 64, 48),
            region(13, 1, " a red\tcar", 30.5, 20.25, 10, 10),       # merged with region 11
            region(14, 1, "sky", -5, -3, 20, 10),                     # clamped to [0, 0, 15, 7]
            region(15, 1, "", 1, 1, 5, 5),                            # empty phrase: dropped
            region(16, 1, "grass", 100, 60, 10, 10),                  # outside: dropped
            region(17, 1, "sky", 60, 40, 10, 10),                     # clamped, merged with 14
        ]},
        {"id": 2, "regions": [region(21, 2, "a dog", 1, 2, 3, 4)]},
        {"id": 3, "regions": [region(31, 3, "a cat", 1, 2, 3, 4)]},
    ]
    data = [image_data(1, 64, 48, "VG_100K_2"), image_data(2, 32, 32)]
    paths = {
        "regions": tmp_path / "region_descriptions.json",
        "image_data": tmp_path / "image_data.json",
        "images": images,
        "split_file": tmp_path / "data_splits.pickle",
    }
    paths["regions"].write_text(json.dumps(regions))
    paths["image_data"].write_text(json.dumps(data))
    with open(paths["split_file"], "wb") as handle:
        pickle.dump({"train": {1, 3}, "test": {2}}, handle, protocol=2)
    return paths


def read(vg, split=None, with_split_file=False, **overrides):
    paths = {**vg, **overrides}
    problems = ProblemLog()
    args = [paths["regions"], paths["image_data"], paths["images"]]
    if with_split_file:
        args.append(paths["split_file"])
    return list(read_visual_genome(*args, split=split, problems=problems)), problems


def test_records_end_to_end(vg):
    records, problems = read(vg)
    assert [r.id for r in records] == ["1", "2"]
    first, second = records
    assert (first.width, first.height, second.width, second.height) == (64, 48, 32, 32)
    assert first.image == os.path.abspath(vg["images"] / "VG_100K_2" / "1.jpg")
    assert second.image == os.path.abspath(vg["images"] / "2.jpg")
    assert first.captions == ["a red car", "the tree", "sky"]
    assert [(p.text, p.boxes) for p in first.phrases] == [
        ("a red car", [[10, 5, 30, 15], [30.5, 20.25, 40.5, 30.25]]),
        ("the tree", [[0, 0, 64, 48]]),
        ("sky", [[0, 0, 15, 7], [60, 40, 64, 48]]),
    ]
    assert all(p.caption is None and p.start is None and p.category is None
               for p in first.phrases)
    assert [(p.text, p.boxes) for p in second.phrases] == [("a dog", [[1, 2, 4, 6]])]
    for record in records:
        assert list(check_record(record)) == []
        json.dumps(record.to_json())  # plain numbers, no Decimal
    assert all(isinstance(v, (int, float)) for p in first.phrases for b in p.boxes for v in b)


def test_problems_are_logged_not_raised(vg):
    _, problems = read(vg)
    by_field = {(p.where, p.field): p for p in problems}
    assert by_field[("image 1", "region 14.box")].skipped is False
    assert "clamped to [0, 0, 15, 7]" in by_field[("image 1", "region 14.box")].message
    assert by_field[("image 1", "region 17.box")].skipped is False
    assert by_field[("image 1", "region 15")].skipped is False
    assert "empty" in by_field[("image 1", "region 15")].message
    assert "no area" in by_field[("image 1", "region 16.box")].message
    missing = by_field[("image 3", "id")]
    assert missing.skipped is True and "image_data" in missing.message
    assert problems.skipped_records == 1
    assert all(p.file == str(vg["regions"]) for p in problems)


def test_split_from_the_reference_pickle(vg):
    train, _ = read(vg, split="train", with_split_file=True)
    test, _ = read(vg, split="test", with_split_file=True)
    everything, _ = read(vg, split=None, with_split_file=True)
    assert [r.id for r in train] == ["1"]  # 3 is in train but not in image_data
    assert [r.id for r in test] == ["2"]
    assert [r.id for r in everything] == ["1", "2"]


def test_split_needs_the_split_file(vg):
    with pytest.raises(DatasetError, match="split file"):
        read(vg, split="train")


def test_unknown_split_lists_the_available_ones(vg):
    with pytest.raises(DatasetError, match="no split 'val'.*test, train"):
        read(vg, split="val", with_split_file=True)


@pytest.mark.parametrize("content, found", [
    ([1, 2, 3], "found list"),
    ({"train": "1 2 3"}, "split 'train' holds str"),
    ({"train": {1, "two"}}, "non-integer id 'two'"),
    ({1: {1}}, "key 1"),
])
def test_split_pickle_with_the_wrong_structure(vg, content, found):
    with open(vg["split_file"], "wb") as handle:
        pickle.dump(content, handle, protocol=2)
    with pytest.raises(DatasetError) as info:
        read(vg, split="train", with_split_file=True)
    assert str(vg["split_file"]) in str(info.value)
    assert found in str(info.value)


def test_split_pickle_that_could_run_code_is_refused(vg):
    vg["split_file"].write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"os\.system"):
        read(vg, split="train", with_split_file=True)


def test_image_without_usable_region_is_skipped(vg):
    vg["regions"].write_text(json.dumps([
        {"id": 2, "regions": [region(21, 2, "   ", 1, 1, 2, 2),
                              region(22, 2, "a dog", 40, 40, 5, 5),
                              "not a region", {"phrase": "no box"},
                              region(23, 2, "bad box", "1", 1, 2, 2)]},
        {"id": 1, "regions": "none"},
        {"regions": []},
        {"id": 1, "regions": [region(11, 1, "kept", 1, 1, 2, 2)]},
    ]))
    records, problems = read(vg)
    assert [r.id for r in records] == ["1"]
    wheres = [(p.where, p.field, p.skipped) for p in problems]
    assert ("image 2", "regions", True) in wheres
    assert ("image 2", "regions[2]", False) in wheres
    assert ("image 2", "regions[3]", False) in wheres
    assert ("image 2", "region 23", False) in wheres
    assert ("image 1", "regions", True) in wheres
    assert ("item 2", "id", True) in wheres


def test_image_data_entry_without_size(vg):
    vg["image_data"].write_text(json.dumps([{"image_id": 1, "width": None, "height": 48},
                                            image_data(2, 32, 32)]))
    records, problems = read(vg)
    assert [r.id for r in records] == ["2"]
    skipped = [p for p in problems if p.where == "image 1" and p.skipped]
    assert len(skipped) == 1 and "no usable size" in skipped[0].message


def test_missing_files(vg, tmp_path):
    for key in ("regions", "image_data", "images"):
        with pytest.raises(DatasetNotFoundError, match="nothere"):
            read(vg, **{key: tmp_path / "nothere"})
    with pytest.raises(DatasetNotFoundError, match="nothere"):
        read(vg, split="train", with_split_file=True, split_file=tmp_path / "nothere.pickle")


@pytest.mark.parametrize("content", [b"this is not json", b'[{"id": 1, "regions": [',
                                     b'[{"id": 1, "regions": [{"phrase": "caf\xe9"}]}]',
                                     b'{"id": 1}', b""])
def test_regions_file_that_is_not_a_json_list(vg, content):
    vg["regions"].write_bytes(content)
    with pytest.raises(DatasetError) as info:
        read(vg)
    assert str(vg["regions"]) in str(info.value)


def test_image_data_file_that_is_not_json(vg):
    vg["image_data"].write_bytes(b"[{\"image_id\": 1,,}]")
    with pytest.raises(DatasetError, match="image_data.json"):
        read(vg)


REGION_LINE = ('{{"region_id": {region_id}, "width": {width}, "height": 30, '
               '"image_id": {image_id}, "phrase": "a red car near tree number {n}", '
               '"y": {y}, "x": {x}}}')


def test_memory_does_not_grow_with_the_regions_file(tmp_path):
    """4,000 images of 10 regions: streaming keeps far less than the file; json.load would keep ~5x it."""
    count = 4_000
    regions_path, data_path = tmp_path / "region_descriptions.json", tmp_path / "image_data.json"
    with open(regions_path, "w") as handle:
        handle.write("[")
        for image_id in range(1, count + 1):
            regions = ", ".join(REGION_LINE.format(region_id=image_id * 10 + n, image_id=image_id,
                                                   n=n, x=5 * n, y=3 * n, width=40 + n)
                                for n in range(10))
            separator = "," if image_id > 1 else ""
            handle.write(f'{separator}{{"regions": [{regions}], "id": {image_id}}}')
        handle.write("]")
    data_path.write_text(json.dumps([image_data(i, 800, 600) for i in range(1, count + 1)]))
    (tmp_path / "images").mkdir()
    size = regions_path.stat().st_size
    problems = ProblemLog()
    tracemalloc.start()
    try:
        seen = 0
        for record in read_visual_genome(regions_path, data_path, tmp_path / "images",
                                         problems=problems):
            seen += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count and not problems
    assert [len(p.boxes) for p in record.phrases] == [1] * 10
    assert peak < 0.5 * size, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
