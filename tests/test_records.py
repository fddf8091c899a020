import pytest

from multigrounding.datasets.records import Phrase, Record, RecordError, box_problem, check_record

GOOD = {"id": "39769", "image": "images/a.jpg", "width": 640, "height": 480,
        "captions": ["two cats sleeping on a pink blanket"],
        "phrases": [{"text": "two cats", "caption": 0, "start": 0, "boxes": [[17.5, 54.4, 318.8, 469.4]],
                     "category": "animals"},
                    {"text": "the cat on the left", "boxes": [[17.5, 54.4, 318.8, 469.4]]}]}


def test_round_trip_keeps_every_field_and_relative_path(tmp_path):
    record = Record.from_json(GOOD, root=tmp_path)
    assert record.image == str(tmp_path / "images" / "a.jpg")
    assert record.phrases[0].category == "animals" and record.phrases[1].caption is None
    assert record.to_json(root=tmp_path) == GOOD
    assert list(check_record(record)) == []


def test_the_optional_chain_round_trips_and_old_phrases_have_none(tmp_path):
    """Flickr30k's coreference chain id is kept when present; manifests written before it read as
    before (no chain) and write back unchanged."""
    with_chain = {**GOOD, "phrases": [{**GOOD["phrases"][0], "chain": "18"}, GOOD["phrases"][1]]}
    record = Record.from_json(with_chain, root=tmp_path)
    assert [p.chain for p in record.phrases] == ["18", None]
    assert record.to_json(root=tmp_path) == with_chain
    assert [p.chain for p in Record.from_json(GOOD).phrases] == [None, None]
    assert "chain" not in Record.from_json(GOOD).to_json()["phrases"][0]


@pytest.mark.parametrize("change, field", [
    ({"id": ""}, "id"),
    ({"id": True}, "id"),
    ({"image": 3}, "image"),
    ({"width": -1}, "width"),
    ({"captions": "a cat"}, "captions"),
    ({"captions": ["ok", 5]}, "captions[1]"),
    ({"phrases": [{"text": "x", "boxes": [[1, 2, 3]]}]}, "phrases[0].boxes[0]"),
    ({"phrases": [{"text": "x", "boxes": [[1, 2, 3, float("nan")]]}]}, "phrases[0].boxes[0]"),
    ({"phrases": [{"text": "x", "caption": 0}]}, "phrases[0].start"),
    ({"phrases": [{"text": "x", "caption": 0, "start": -1}]}, "phrases[0].start"),
    ({"phrases": [{"boxes": []}]}, "phrases[0].text"),
    ({"phrases": [{"text": "x", "chain": 18}]}, "phrases[0].chain"),
    ({"phrases": [{"text": "x", "chain": " "}]}, "phrases[0].chain"),
    ({"colour": "red"}, "colour"),
])
def test_malformed_records_name_the_field(change, field):
    with pytest.raises(RecordError) as info:
        Record.from_json({**GOOD, **change})
    assert info.value.field == field


def test_check_record_finds_content_problems():
    record = Record(id="1", image="/x.jpg", width=100, height=50,
                    captions=["a red circle above a blue square", "  "],
                    phrases=[Phrase("a red circle", [[10, 10, 20, 20]], caption=0, start=0),
                             Phrase("a blue square", [[30, 10, 20, 20]], caption=0, start=4),
                             Phrase("a blue circle", [[0, 0, 101, 10]], caption=0, start=4),
                             Phrase("x", [], caption=3, start=0)])
    found = dict(check_record(record))
    assert set(found) == {"captions[1]", "phrases[1].boxes[0]", "phrases[2].boxes[0]",
                          "phrases[2].text", "phrases[3].caption"}
    assert "out of order" in found["phrases[1].boxes[0]"]
    assert "width 100" in found["phrases[2].boxes[0]"]
    assert "'a blue square'" in found["phrases[2].text"]


def test_box_bounds_are_inclusive_of_the_image_border():
    assert box_problem([0, 0, 640, 480], 640, 480) is None
    assert box_problem([0, 0, 640.5, 480], 640, 480)
    assert box_problem([-0.5, 0, 10, 10], 640, 480)
    assert box_problem([5, 5, 5, 5], None, None) is None


def test_real_example_from_shared_data_is_clean():
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared/data/coco-39769/manifest.jsonl"
    if not path.exists():
        pytest.skip("../shared is not beside the checkout")
    record = Record.from_json(json.loads(path.read_text()), root=path.parent)
    assert list(check_record(record)) == []
    assert [p.start for p in record.phrases] == [0, 4, 9]
