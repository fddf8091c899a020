"""ReferIt (refclef): refs(unc).p + instances.json (+ Hu et al.'s image lists) → records."""
from __future__ import annotations

import json
import os
import pickle

import pytest

from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import check_record
from multigrounding.datasets.referit import read_referit
from multigrounding.errors import DatasetError, DatasetNotFoundError, UnsafePickleError


def sentence(sent_id, text):
    return {"tokens": text.split(), "raw": text.upper(), "sent_id": sent_id, "sent": text}


def ref(ref_id, image_id, ann_id, category_id, split, *texts):
    sentences = [sentence(ref_id * 10 + i, t) for i, t in enumerate(texts)]
    return {"sent_ids": [s["sent_id"] for s in sentences], "file_name": f"{image_id}_{ref_id}.jpg",
            "ann_id": ann_id, "ref_id": ref_id, "image_id": image_id, "split": split,
            "sentences": sentences, "category_id": category_id}


def instances():
    images = [{"id": i, "file_name": f"{i // 1000}/images/{i}.jpg", "width": w, "height": h}
              for i, w, h in [(25008, 64, 48), (25009, 32, 32), (25010, 50, 50)]]
    annotations = [
        {"id": 1000, "image_id": 25008, "bbox": [5, 6, 10, 12], "category_id": 1,
         "segmentation": {"counts": "abc", "size": [48, 64]}, "area": 120},
        {"id": 1001, "image_id": 25008, "bbox": [50.5, 40, 30, 20], "category_id": 2},
        {"id": 2000, "image_id": 25009, "bbox": [0, 0, 32, 32], "category_id": 1},
        {"id": 3000, "image_id": 25010, "bbox": [1, 1, 2, 2], "category_id": 1},
    ]
    categories = [{"id": 1, "name": "man"}, {"id": 2, "name": "sky"}]
    return {"images": images, "annotations": annotations, "categories": categories}


@pytest.fixture
def referit(tmp_path):
    refs = [
        ref(1, 25008, 1000, 1, "train", "man on left", "man  on left ", "the guy"),
        ref(2, 25008, 1001, 2, "train", "sky", "man on left"),
        ref(3, 25009, 2000, 1, "test", "whole picture"),
        ref(4, 25010, 9999, 1, "train", "nothing here"),  # its annotation is missing
    ]
    paths = {"refs": tmp_path / "refs(unc).p", "instances": tmp_path / "instances.json",
             "images": tmp_path / "saiapr_tc-12", "splits": tmp_path / "splits"}
    with open(paths["refs"], "wb") as handle:
        pickle.dump(refs, handle, protocol=2)
    paths["instances"].write_text(json.dumps(instances()))
    paths["images"].mkdir()
    paths["splits"].mkdir()
    (paths["splits"] / "referit_train_imlist.txt").write_text("25008\n25010\n")
    (paths["splits"] / "referit_test_imlist.txt").write_text("25009\n\n")
    return paths


def read(paths, split=None, split_dir=False, **overrides):
    paths = {**paths, **overrides}
    args = [paths["refs"], paths["instances"], paths["images"]]
    if split_dir:
        args.append(paths["splits"])
    problems = ProblemLog()
    return list(read_referit(*args, split=split, problems=problems)), problems


def test_records_end_to_end(referit):
    records, problems = read(referit)
    assert [r.id for r in records] == ["25008", "25009"]
    first, second = records
    assert first.image == os.path.abspath(referit["images"] / "25" / "images" / "25008.jpg")
    assert (first.width, first.height, second.width, second.height) == (64, 48, 32, 32)
    assert first.captions == ["man on left", "the guy", "sky"]
    assert [(p.text, p.boxes, p.category) for p in first.phrases] == [
        ("man on left", [[5, 6, 15, 18]], "man"),
        ("the guy", [[5, 6, 15, 18]], "man"),
        ("sky", [[50.5, 40, 64, 48]], "sky"),           # [50.5, 40, 80.5, 60] clamped
        ("man on left", [[50.5, 40, 64, 48]], "sky"),   # same words, another ref: its own query
    ]
    assert all(p.caption is None and p.start is None for p in first.phrases)
    assert [(p.text, p.boxes) for p in second.phrases] == [("whole picture", [[0, 0, 32, 32]])]
    for record in records:
        assert list(check_record(record)) == []
        json.dumps(record.to_json())


def test_problems_are_logged_not_raised(referit):
    _, problems = read(referit)
    found = {(p.where, p.field): p for p in problems}
    clamp = found[("ref 2", "bbox")]
    assert clamp.skipped is False and "clamped to [50.5, 40, 64, 48]" in clamp.message
    missing_ann = found[("ref 4", "ann_id")]
    assert missing_ann.skipped is False and "9999" in missing_ann.message
    assert found[("image 25010", "refs")].skipped is True
    assert problems.skipped_records == 1


def test_split_from_hu_et_al_image_lists(referit):
    train, problems = read(referit, split="train", split_dir=True)
    test, _ = read(referit, split="test", split_dir=True)
    assert [r.id for r in train] == ["25008"]  # 25010's only ref has no annotation
    assert [r.id for r in test] == ["25009"]
    assert ("image 25010", "refs") in {(p.where, p.field) for p in problems}


def test_image_list_overrides_the_refs_split_field(referit):
    (referit["splits"] / "referit_val_imlist.txt").write_text("25009\n")
    records, _ = read(referit, split="val", split_dir=True)
    assert [r.id for r in records] == ["25009"]  # its ref says "test"


def test_split_from_each_refs_split_field(referit):
    train, _ = read(referit, split="train")
    test, _ = read(referit, split="test")
    assert [r.id for r in train] == ["25008"]
    assert [r.id for r in test] == ["25009"]


def test_unknown_ref_split_lists_the_available_ones(referit):
    with pytest.raises(DatasetError, match="no ref has split 'val'.*test, train"):
        read(referit, split="val")


def test_missing_image_list_names_it(referit):
    with pytest.raises(DatasetNotFoundError, match=r"referit_val_imlist\.txt.*test, train"):
        read(referit, split="val", split_dir=True)


def test_image_list_with_a_bad_line(referit):
    (referit["splits"] / "referit_train_imlist.txt").write_text("25008\n25O10\n")
    with pytest.raises(DatasetError, match=r"referit_train_imlist\.txt:2:.*25O10"):
        read(referit, split="train", split_dir=True)


def test_python2_refs_pickle(referit):
    referit["refs"].write_bytes(
        b"(lp0\n(dp1\nS'ref_id'\np2\nI7\nsS'ann_id'\np3\nI1000\nsS'image_id'\np4\nI25008\n"
        b"sS'category_id'\np5\nI1\nsS'split'\np6\nS'train'\np7\nsS'sentences'\np8\n(lp9\n"
        b"(dp10\nS'sent'\np11\nS'caf\\xe9 table'\np12\nsS'sent_id'\np13\nI5\nsasa.")
    records, _ = read(referit)
    assert [(r.id, r.captions, r.phrases[0].boxes) for r in records] == [
        ("25008", ["caf\xe9 table"], [[5, 6, 15, 18]])]


def test_bad_refs_are_skipped_with_a_problem(referit):
    good = ref(1, 25008, 1000, 1, "train", "man on left")
    no_ann = {k: v for k, v in ref(5, 25009, 2000, 1, "test", "x").items() if k != "ann_id"}
    bad_sentences = ref(6, 25009, 2000, 1, "test")
    bad_sentences["sentences"] = [{"sent": "   "}, "oops"]
    wrong_image = ref(7, 25009, 1000, 1, "test", "belongs elsewhere")
    with open(referit["refs"], "wb") as handle:
        pickle.dump(["not a ref", good, no_ann, bad_sentences, wrong_image,
                     {"ann_id": "1000"}], handle, protocol=2)
    records, problems = read(referit)
    assert [r.id for r in records] == ["25008"]
    found = {(p.where, p.field) for p in problems}
    assert {("refs[0]", "ref"), ("ref 5", "ann_id"), ("ref 6", "sentences[0].sent"),
            ("ref 6", "sentences[1].sent"), ("ref 6", "sentences"), ("ref 7", "ann_id"),
            ("refs[5]", "ref_id"), ("image 25009", "refs")} <= found


def test_unknown_category_leaves_the_phrase_without_one(referit):
    with open(referit["refs"], "wb") as handle:
        pickle.dump([ref(1, 25008, 1000, 42, "train", "a thing")], handle, protocol=2)
    records, problems = read(referit)
    assert records[0].phrases[0].category is None
    assert ("ref 1", "category_id") in {(p.where, p.field) for p in problems}


def test_image_missing_from_instances_is_skipped(referit):
    data = instances()
    data["images"] = data["images"][1:]
    referit["instances"].write_text(json.dumps(data))
    records, problems = read(referit)
    assert [r.id for r in records] == ["25009"]
    skipped = [(p.where, p.skipped) for p in problems if p.field == "images"]
    assert skipped == [("image 25008", True)]


@pytest.mark.parametrize("content", [{"refs": []}, "refs", None])
def test_refs_pickle_that_is_not_a_list(referit, content):
    with open(referit["refs"], "wb") as handle:
        pickle.dump(content, handle, protocol=2)
    with pytest.raises(DatasetError, match=r"refs\(unc\)\.p: expected a list of refs"):
        read(referit)


def test_refs_pickle_that_could_run_code_is_refused(referit):
    referit["refs"].write_bytes(b"cposix\nsystem\n(S'echo hi'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"posix\.system"):
        read(referit)


@pytest.mark.parametrize("content", [b"not json at all", b'{"images": [{"id": 25008, ', b"[]",
                                     b'{"images": "none", "annotations": []}'])
def test_instances_file_that_is_not_a_coco_json_object(referit, content):
    referit["instances"].write_bytes(content)
    with pytest.raises(DatasetError) as info:
        read(referit)
    assert str(referit["instances"]) in str(info.value)


def test_instances_file_that_is_a_list_fails_before_reading_it(referit):
    referit["instances"].write_bytes(b"[" + b"1, " * 1000 + b"oops")
    with pytest.raises(DatasetError, match="expected a JSON object"):
        read(referit)


def test_missing_files(referit, tmp_path):
    for key in ("refs", "instances", "images"):
        with pytest.raises(DatasetNotFoundError, match="nothere"):
            read(referit, **{key: tmp_path / "nothere"})
    with pytest.raises(DatasetNotFoundError, match="nothere"):
        read(referit, split="train", split_dir=True, splits=tmp_path / "nothere")
