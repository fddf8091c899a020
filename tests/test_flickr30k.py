"""Flickr30k Entities reader: native fixtures read end to end, and every kind of bad input."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from multigrounding.datasets.flickr30k import MarkupError, parse_sentence, read_flickr30k
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import NOBOX, NOTVISUAL, SCENE, check_record
from multigrounding.errors import DatasetError, DatasetNotFoundError


# ----------------------------------------------------------------------------- fixture helpers

def box(xmin, ymin, xmax, ymax) -> str:
    return (f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
            f"<ymax>{ymax}</ymax></bndbox>")


def boxed(names, *coords) -> str:
    """An <object> naming ``names``, one bndbox per 1-based coordinate tuple (as in the files)."""
    tags = "".join(f"<name>{n}</name>" for n in names)
    return f"<object>{tags}{''.join(box(*c) for c in coords)}</object>"


def unboxed(name, scene: bool = False) -> str:
    return (f"<object><name>{name}</name><nobndbox>1</nobndbox>"
            f"<scene>{1 if scene else 0}</scene></object>")


def annotation_xml(image_id: str, width: int, height: int, objects: list[str]) -> str:
    return (f"<annotation>\n<filename>{image_id}.jpg</filename>\n<size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>\n"
            + "\n".join(objects) + "\n</annotation>\n")


def write_entry(root: Path, image_id: str, sentences: str | bytes | None,
                xml: str | None) -> None:
    """Write Sentences/<id>.txt and Annotations/<id>.xml (None leaves a file out)."""
    (root / "Sentences").mkdir(parents=True, exist_ok=True)
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    if sentences is not None:
        data = sentences if isinstance(sentences, bytes) else sentences.encode("utf-8")
        (root / "Sentences" / f"{image_id}.txt").write_bytes(data)
    if xml is not None:
        (root / "Annotations" / f"{image_id}.xml").write_text(xml, encoding="utf-8")


GOOD_ID = "9999"


def write_good(root: Path) -> None:
    """A well-formed image that every bad-input test keeps, to show the stream goes on."""
    write_entry(root, GOOD_ID, "[/EN#1/people A man] runs .\n",
                annotation_xml(GOOD_ID, 64, 48, [boxed(["1"], (2, 3, 20, 30))]))


def read(root: Path, image_dir: Path | None = None, split: str | None = None):
    problems = ProblemLog()
    records = list(read_flickr30k(root, image_dir or root / "images", split=split,
                                  problems=problems))
    for record in records:
        assert list(check_record(record)) == []
    return {r.id: r for r in records}, list(problems), problems


# ----------------------------------------------------------------------------- the good path

SENTENCES_1000 = (
    "[/EN#18/people A child] in [/EN#19/clothing a pink dress] is climbing up "
    "[/EN#20/other a set of stairs] in [/EN#21/scene an entry way] .\n"
    "[/EN#18/people/other A little girl] in [/EN#19/clothing a pink dress] going into "
    "[/EN#22/other a wooden cabin] .\n"
    "[/EN#0/notvisual Someone] watches [/EN#23/animals two dogs] .\n"
)
XML_1000 = annotation_xml("1000", 500, 375, [
    boxed(["18"], (1, 1, 100, 200)),
    boxed(["19"], (201, 11, 300, 150)),
    boxed(["18"], (50, 60, 70, 80)),           # a second box for chain 18
    unboxed("20"),                             # nobndbox: no box, not scene
    unboxed("21", scene=True),                 # the whole scene
    boxed(["22", "23"], (401, 301, 500, 375)),  # one box, two chains
    boxed(["23"], (11, 21, 31, 41)),
])


@pytest.fixture
def dataset(tmp_path, image_factory):
    root = tmp_path / "flickr30k_entities"
    write_entry(root, "1000", SENTENCES_1000, XML_1000)
    write_entry(root, "2000", "[/EN#5/animals A dog] catches [/EN#6/other a frisbee] .\n",
                annotation_xml("2000", 64, 48, [boxed(["5"], (1, 1, 64, 48)),
                                                boxed(["6"], (10, 10, 20, 20))]))
    write_entry(root, "3000", "[/EN#7/vehicles A red car] .\n",
                annotation_xml("3000", 32, 24, [boxed(["7"], (5, 5, 10, 10))]))
    (root / "train.txt").write_text("1000\n3000\n", encoding="utf-8")
    (root / "val.txt").write_text("\n", encoding="utf-8")
    (root / "test.txt").write_text("2000\n", encoding="utf-8")
    image_factory("flickr30k-images/1000.jpg", 500, 375)
    image_factory("flickr30k-images/2000.jpg", 64, 48, seed=1)
    image_factory("flickr30k-images/3000.jpg", 32, 24, seed=2)
    images = tmp_path / "flickr30k-images"
    return root, images


def test_reads_every_annotation_sorted_with_sizes_and_paths(dataset):
    root, images = dataset
    problems = ProblemLog()
    records = list(read_flickr30k(root, images, problems=problems))
    assert [r.id for r in records] == ["1000", "2000", "3000"]
    assert not problems
    assert [(r.width, r.height) for r in records] == [(500, 375), (64, 48), (32, 24)]
    assert records[1].image == os.path.abspath(images / "2000.jpg")
    assert os.path.isabs(records[0].image)


def test_clean_captions_starts_and_categories(dataset):
    records, problems, _ = read(*dataset)
    assert problems == []
    record = records["1000"]
    assert record.captions == [
        "A child in a pink dress is climbing up a set of stairs in an entry way .",
        "A little girl in a pink dress going into a wooden cabin .",
        "Someone watches two dogs .",
    ]
    got = [(p.text, p.caption, p.start, p.category) for p in record.phrases]
    assert got == [
        ("A child", 0, 0, "people"), ("a pink dress", 0, 3, "clothing"),
        ("a set of stairs", 0, 9, "other"), ("an entry way", 0, 14, "scene"),
        ("A little girl", 1, 0, "people"),  # two types: the first is the category
        ("a pink dress", 1, 4, "clothing"), ("a wooden cabin", 1, 9, "other"),
        ("Someone", 2, 0, "notvisual"), ("two dogs", 2, 2, "animals"),
    ]


def test_boxes_per_chain_are_zero_based(dataset):
    records, _, _ = read(*dataset)
    phrases = {(p.caption, p.start): p for p in records["1000"].phrases}
    # Both objects naming chain 18, each coordinate minus 1 (official utils convention).
    assert phrases[0, 0].boxes == [[0.0, 0.0, 99.0, 199.0], [49.0, 59.0, 69.0, 79.0]]
    assert phrases[1, 0].boxes == phrases[0, 0].boxes
    assert phrases[0, 3].boxes == [[200.0, 10.0, 299.0, 149.0]]
    # The object named both 22 and 23 gives its box to both chains.
    assert phrases[1, 9].boxes == [[400.0, 300.0, 499.0, 374.0]]
    assert phrases[2, 2].boxes == [[400.0, 300.0, 499.0, 374.0], [10.0, 20.0, 30.0, 40.0]]
    assert all(isinstance(v, float) for p in phrases.values() for b in p.boxes for v in b)
    # Phrases of one chain do not share a list another reader could mutate.
    assert phrases[1, 0].boxes is not phrases[0, 0].boxes


def test_every_phrase_keeps_its_chain_id(dataset):
    """The chain (EN#id) says which mentions are one entity: "A child" and "A little girl" are
    chain 18 in two captions; the not-visual chain 0 is no entity and is left out."""
    records, _, _ = read(*dataset)
    assert [(p.text, p.chain) for p in records["1000"].phrases] == [
        ("A child", "18"), ("a pink dress", "19"), ("a set of stairs", "20"),
        ("an entry way", "21"), ("A little girl", "18"), ("a pink dress", "19"),
        ("a wooden cabin", "22"), ("Someone", None), ("two dogs", "23")]
    assert [p.to_json()["chain"] for p in records["2000"].phrases] == ["5", "6"]


def test_notvisual_scene_and_nobox_types(dataset):
    records, _, _ = read(*dataset)
    types = {p.text: (p.type, p.boxes) for p in records["1000"].phrases}
    assert types["Someone"] == (NOTVISUAL, [])
    assert types["an entry way"] == (SCENE, [])
    assert types["a set of stairs"] == (NOBOX, [])
    assert types["A child"][0] is None and types["two dogs"][0] is None


def test_notvisual_type_on_a_nonzero_chain_has_no_boxes(tmp_path):
    write_entry(tmp_path, "1", "[/EN#4/notvisual Nobody] sees [/EN#5/people a man] .\n",
                annotation_xml("1", 64, 48, [boxed(["4"], (1, 1, 5, 5)),
                                             boxed(["5"], (1, 1, 9, 9))]))
    records, problems, _ = read(tmp_path)
    assert [(p.type, p.boxes) for p in records["1"].phrases] == [
        (NOTVISUAL, []), (None, [[0.0, 0.0, 8.0, 8.0]])]
    assert problems == []


def test_split_selects_the_listed_ids(dataset):
    root, images = dataset
    assert list(read(root, images, split="test")[0]) == ["2000"]
    assert list(read(root, images, split="train")[0]) == ["1000", "3000"]
    assert read(root, images, split="val")[0] == {}


def test_records_stream_one_image_at_a_time(tmp_path):
    write_entry(tmp_path, "1", "[/EN#1/people A man] .\n",
                annotation_xml("1", 64, 48, [boxed(["1"], (1, 1, 5, 5))]))
    write_entry(tmp_path, "2", None, annotation_xml("2", 64, 48, []))
    problems = ProblemLog()
    stream = read_flickr30k(tmp_path, tmp_path, problems=problems)
    assert next(stream).id == "1"
    assert not problems  # image 2 has not been looked at yet
    assert list(stream) == []
    assert len(problems) == 1


def test_parse_sentence_words_and_mentions():
    words, mentions = parse_sentence("[/EN#3/people/other Two men] play [/EN#0/notvisual it]")
    assert words == ["Two", "men", "play", "it"]
    assert [(m.chain, m.types, m.start, m.words) for m in mentions] == [
        ("3", ["people", "other"], 0, ["Two", "men"]), ("0", ["notvisual"], 3, ["it"])]


# ----------------------------------------------------------------------------- missing folders

def test_missing_split_file_names_it_and_lists_present_ones(dataset):
    root, images = dataset
    (root / "val.txt").unlink()
    with pytest.raises(DatasetNotFoundError) as error:
        read_flickr30k(root, images, split="val", problems=ProblemLog())
    message = str(error.value)
    assert str(root / "val.txt") in message
    assert "test.txt, train.txt" in message


@pytest.mark.parametrize("missing", ["", "Sentences", "Annotations"])
def test_missing_folders_raise_naming_the_path(tmp_path, missing):
    root = tmp_path / "entities"
    write_entry(root, "1", "[/EN#1/people A man] .\n", annotation_xml("1", 9, 9, []))
    target = root / missing if missing else tmp_path / "elsewhere"
    if missing:
        for child in target.iterdir():
            child.unlink()
        target.rmdir()
    with pytest.raises(DatasetNotFoundError, match="not found") as error:
        read_flickr30k(target if not missing else root, tmp_path, problems=ProblemLog())
    assert str(target) in str(error.value)


def test_unreadable_split_file_is_a_dataset_error(dataset):
    root, images = dataset
    (root / "test.txt").write_bytes(b"\xff\xfe2000\n")
    with pytest.raises(DatasetError, match="test.txt"):
        read_flickr30k(root, images, split="test", problems=ProblemLog())


# ----------------------------------------------------------------------------- skipped records

def only(problems):
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def test_missing_sentence_file_skips_the_image(tmp_path):
    write_good(tmp_path)
    write_entry(tmp_path, "1", None, annotation_xml("1", 64, 48, []))
    records, problems, log = read(tmp_path)
    assert list(records) == [GOOD_ID]
    problem = only(problems)
    assert (problem.file, problem.where, problem.field, problem.skipped) == (
        str(tmp_path / "Sentences" / "1.txt"), "image 1", "Sentences", True)
    assert "not found" in problem.message
    assert log.skipped_records == 1


def test_missing_annotation_file_skips_the_image(tmp_path):
    write_good(tmp_path)
    write_entry(tmp_path, "1", "[/EN#1/people A man] .\n", None)
    (tmp_path / "test.txt").write_text(f"1\n{GOOD_ID}\n")
    records, problems, _ = read(tmp_path, split="test")
    assert list(records) == [GOOD_ID]
    problem = only(problems)
    assert (problem.file, problem.where, problem.field, problem.skipped) == (
        str(tmp_path / "Annotations" / "1.xml"), "image 1", "Annotations", True)


def test_xml_that_does_not_parse_skips_the_image(tmp_path):
    write_good(tmp_path)
    write_entry(tmp_path, "1", "[/EN#1/people A man] .\n", "<annotation><size>")
    records, problems, _ = read(tmp_path)
    assert list(records) == [GOOD_ID]
    problem = only(problems)
    assert (problem.file, problem.where, problem.field, problem.skipped) == (
        str(tmp_path / "Annotations" / "1.xml"), "image 1", "Annotations", True)
    assert "XML" in problem.message


@pytest.mark.parametrize("size", [
    "", "<size><width>64</width><depth>3</depth></size>",
    "<size><width>abc</width><height>48</height></size>",
    "<size><width>0</width><height>48</height></size>",
])
def test_xml_without_a_valid_size_skips_the_image(tmp_path, size):
    write_good(tmp_path)
    write_entry(tmp_path, "1", "[/EN#1/people A man] .\n",
                f"<annotation>{size}{boxed(['1'], (1, 1, 5, 5))}</annotation>")
    records, problems, _ = read(tmp_path)
    assert list(records) == [GOOD_ID]
    problem = only(problems)
    assert (problem.file, problem.where, problem.field, problem.skipped) == (
        str(tmp_path / "Annotations" / "1.xml"), "image 1", "Annotations size", True)


def test_sentence_file_not_utf8_skips_the_image(tmp_path):
    write_good(tmp_path)
    write_entry(tmp_path, "1", b"[/EN#1/people A man] .\n[/EN#1/people A caf\xe9 man] .\n",
                annotation_xml("1", 64, 48, [boxed(["1"], (1, 1, 5, 5))]))
    records, problems, log = read(tmp_path)
    assert list(records) == [GOOD_ID]
    problem = only(problems)
    assert (problem.file, problem.where, problem.field, problem.skipped) == (
        str(tmp_path / "Sentences" / "1.txt"), 2, "sentence", True)
    assert "UTF-8" in problem.message and "0xe9" in problem.message
    assert log.skipped_records == 1


def test_image_whose_every_sentence_is_dropped_is_skipped_once(tmp_path):
    write_good(tmp_path)
    write_entry(tmp_path, "1", "[/EN#1/people A man\n\nA ] man\n",
                annotation_xml("1", 64, 48, [boxed(["1"], (1, 1, 5, 5))]))
    records, problems, log = read(tmp_path)
    assert list(records) == [GOOD_ID]
    assert [(p.where, p.skipped) for p in problems] == [
        (1, False), (2, False), (3, False), ("image 1", True)]
    assert problems[-1].file == str(tmp_path / "Sentences" / "1.txt")
    assert log.skipped_records == 1


def test_listed_id_twice_or_with_a_path_is_skipped(tmp_path):
    write_good(tmp_path)
    (tmp_path / "test.txt").write_text(f"{GOOD_ID}\n../x\n{GOOD_ID}\n")
    records, problems, _ = read(tmp_path, split="test")
    assert list(records) == [GOOD_ID]
    assert [(p.file, p.where, p.field) for p in problems] == [
        (str(tmp_path / "test.txt"), 2, "id"), (str(tmp_path / "test.txt"), 3, "id")]


# ----------------------------------------------------------------------------- dropped parts

@pytest.mark.parametrize("bad, why", [
    ("[/EN#2/other A hat on [/EN#1/people a man] .", "nested"),
    ("[/EN#2/other A hat", "without ']'"),
    ("A hat ] on a man .", "without '['"),
    ("[/EN#2/other A hat]] on a man .", "stray"),
    ("[/EN#2/other] on a man .", "no words"),
    ("[/EN#2/other ] on a man .", "no words"),
    ("[/EN#x2/other A hat] .", "bad chain id"),
    ("[/EN#/other A hat] .", "bad chain id"),
    ("[/EN#2 A hat] .", "type"),
    ("[/EN#2/other/ A hat] .", "type"),
    ("[EN#2/other A hat] .", "expected"),
])
def test_malformed_markup_drops_only_that_sentence(tmp_path, bad, why):
    write_entry(tmp_path, "1", f"[/EN#1/people A man] .\n{bad}\n[/EN#1/people The man] sits .\n",
                annotation_xml("1", 64, 48, [boxed(["1"], (1, 1, 5, 5)),
                                             boxed(["2"], (1, 1, 5, 5))]))
    records, problems, log = read(tmp_path)
    record = records["1"]
    assert record.captions == ["A man .", "The man sits ."]
    assert [(p.text, p.caption, p.start) for p in record.phrases] == [
        ("A man", 0, 0), ("The man", 1, 0)]  # the third line's phrase is now caption 1
    problem = only(problems)
    assert (problem.file, problem.where, problem.field, problem.skipped) == (
        str(tmp_path / "Sentences" / "1.txt"), 2, "sentence", False)
    assert why in problem.message
    assert log.skipped_records == 0


def test_parse_sentence_raises_markup_error():
    with pytest.raises(MarkupError):
        parse_sentence("[/EN#1/people A [/EN#2/other b] c]")


def test_empty_line_is_dropped(tmp_path):
    write_entry(tmp_path, "1", "[/EN#1/people A man] .\n   \n[/EN#1/people The man] .\n",
                annotation_xml("1", 64, 48, [boxed(["1"], (1, 1, 5, 5))]))
    records, problems, _ = read(tmp_path)
    assert records["1"].captions == ["A man .", "The man ."]
    assert records["1"].phrases[1].caption == 1
    problem = only(problems)
    assert (problem.file, problem.where, problem.field, problem.skipped) == (
        str(tmp_path / "Sentences" / "1.txt"), 2, "sentence", False)
    assert "empty" in problem.message


@pytest.mark.parametrize("bad, why", [
    ((30, 5, 10, 20), "out of order"),     # xmax < xmin
    ((5, 30, 10, 20), "out of order"),     # ymax < ymin
    ((0, 5, 10, 20), "outside"),           # xmin 0 is -1 after the 1-based conversion
    ((5, 5, 66, 20), "outside"),           # beyond width 64
    ((5, 5, 10, 50), "outside"),           # beyond height 48
    (("a", 5, 10, 20), "numeric"),
])
def test_bad_box_is_dropped_and_the_phrase_kept(tmp_path, bad, why):
    write_entry(tmp_path, "1", "[/EN#1/people A man] .\n",
                annotation_xml("1", 64, 48, [boxed(["1"], bad), boxed(["1"], (2, 2, 9, 9))]))
    records, problems, _ = read(tmp_path)
    assert records["1"].phrases[0].boxes == [[1.0, 1.0, 8.0, 8.0]]
    assert records["1"].phrases[0].type is None
    problem = only(problems)
    assert (problem.file, problem.where, problem.field, problem.skipped) == (
        str(tmp_path / "Annotations" / "1.xml"), "image 1", "Annotations box", False)
    assert why in problem.message and "chain 1" in problem.message


def test_box_on_the_last_pixel_is_kept(tmp_path):
    write_entry(tmp_path, "1", "[/EN#1/people A man] .\n",
                annotation_xml("1", 64, 48, [boxed(["1"], (1, 1, 64, 48))]))
    records, problems, _ = read(tmp_path)
    assert records["1"].phrases[0].boxes == [[0.0, 0.0, 63.0, 47.0]]
    assert problems == []


def test_phrase_whose_only_box_is_dropped_becomes_nobox(tmp_path):
    write_entry(tmp_path, "1", "[/EN#1/people A man] .\n",
                annotation_xml("1", 64, 48, [boxed(["1"], (30, 5, 10, 20))]))
    records, problems, _ = read(tmp_path)
    assert (records["1"].phrases[0].type, records["1"].phrases[0].boxes) == (NOBOX, [])
    assert only(problems).field == "Annotations box"


def test_chain_absent_from_xml_is_kept_as_nobox_and_logged_once(tmp_path):
    write_entry(tmp_path, "1", "[/EN#1/people A man] holds [/EN#77/other a cup] .\n"
                "[/EN#77/other The cup] is red .\n[/EN#0/notvisual It] is hot .\n",
                annotation_xml("1", 64, 48, [boxed(["1"], (1, 1, 5, 5))]))
    records, problems, log = read(tmp_path)
    cups = [p for p in records["1"].phrases if p.text in ("a cup", "The cup")]
    assert [(p.type, p.boxes) for p in cups] == [(NOBOX, []), (NOBOX, [])]
    problem = only(problems)  # chain 0 (notvisual) is not reported
    assert (problem.file, problem.where, problem.field, problem.skipped) == (
        str(tmp_path / "Annotations" / "1.xml"), "image 1", "Annotations object", False)
    assert "chain 77" in problem.message
    assert log.skipped_records == 0


def test_object_without_a_name_is_ignored_and_logged(tmp_path):
    write_entry(tmp_path, "1", "[/EN#1/people A man] .\n",
                annotation_xml("1", 64, 48, [f"<object>{box(1, 1, 5, 5)}</object>",
                                             boxed(["1"], (1, 1, 9, 9))]))
    records, problems, _ = read(tmp_path)
    assert records["1"].phrases[0].boxes == [[0.0, 0.0, 8.0, 8.0]]
    problem = only(problems)
    assert (problem.where, problem.field, problem.skipped) == (
        "image 1", "Annotations object", False)
