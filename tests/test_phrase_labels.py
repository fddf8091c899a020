"""Phrase labels: entities and triples from hand-made parses (the extractor's rules alone, whatever
model is installed), the manifest field, and ``datasets phrases`` with an injected parser. The
same captions parsed by en_core_web_sm itself: test_phrase_labels_real.py."""
import json

import pytest
from click.testing import CliRunner

spacy = pytest.importorskip("spacy")
from spacy.tokens import Doc  # noqa: E402

from multigrounding.cli import main  # noqa: E402
from multigrounding.datasets import phrase_labels  # noqa: E402
from multigrounding.datasets.manifest import read_manifest, write_manifest  # noqa: E402
from multigrounding.datasets.phrase_labels import (  # noqa: E402
    ParserNotFoundError, add_phrase_labels, labels_for_record, labels_from_doc, load_parser)
from multigrounding.datasets.records import Label, Phrase, Record, RecordError, check_record  # noqa: E402
from multigrounding.errors import DatasetError  # noqa: E402

BLANK = spacy.blank("en")  # English: noun_chunks needs its syntax iterator
VOCAB = BLANK.vocab


def parse(spec: str) -> Doc:
    """A Doc from "word:head:dep:POS ..." (head an absolute token index), as en_core_web_sm parses."""
    tokens = [t.split(":") for t in spec.split()]
    return Doc(VOCAB, words=[t[0] for t in tokens], heads=[int(t[1]) for t in tokens],
               deps=[t[2] for t in tokens], pos=[t[3] for t in tokens])


# caption → (its parse, expected entities, expected triples); every parse checked by hand.
PARSES = {
    "a man in a red shirt rides a horse": (
        "a:1:det:DET man:6:nsubj:NOUN in:1:prep:ADP a:5:det:DET red:5:amod:ADJ shirt:2:pobj:NOUN "
        "rides:6:ROOT:VERB a:8:det:DET horse:6:dobj:NOUN",
        ["a man", "a red shirt", "a horse"], ["man in shirt", "man rides horse"]),
    "two dogs play on the beach": (
        "two:1:nummod:NUM dogs:2:nsubj:NOUN play:2:ROOT:VERB on:2:prep:ADP the:5:det:DET "
        "beach:3:pobj:NOUN",
        ["two dogs", "the beach"], ["dogs play on beach"]),
    "a woman holding an umbrella": (  # participial clause: the subject is the noun it modifies
        "a:1:det:DET woman:1:ROOT:NOUN holding:1:acl:VERB an:4:det:DET umbrella:2:dobj:NOUN",
        ["a woman", "an umbrella"], ["woman holding umbrella"]),
    "a horse is ridden by a young girl": (  # passive, the agent as the relation's object
        "a:1:det:DET horse:3:nsubjpass:NOUN is:3:auxpass:AUX ridden:3:ROOT:VERB by:3:agent:ADP "
        "a:7:det:DET young:7:amod:ADJ girl:4:pobj:NOUN",
        ["a horse", "a young girl"], ["horse ridden by girl"]),
    "a man and a woman ride bikes": (  # conjoined subjects: one triple each
        "a:1:det:DET man:5:nsubj:NOUN and:1:cc:CCONJ a:4:det:DET woman:1:conj:NOUN "
        "ride:5:ROOT:VERB bikes:5:dobj:NOUN",
        ["a man", "a woman", "bikes"], ["man ride bikes", "woman ride bikes"]),
    "a boy holds a ball and a bat": (  # conjoined objects
        "a:1:det:DET boy:2:nsubj:NOUN holds:2:ROOT:VERB a:4:det:DET ball:2:dobj:NOUN "
        "and:4:cc:CCONJ a:7:det:DET bat:4:conj:NOUN",
        ["a boy", "a ball", "a bat"], ["boy holds ball", "boy holds bat"]),
    "they are playing in the snow": (  # a pronoun is neither an entity nor a triple's subject
        "they:2:nsubj:PRON are:2:aux:AUX playing:2:ROOT:VERB in:2:prep:ADP the:5:det:DET "
        "snow:3:pobj:NOUN",
        ["the snow"], []),
    "a man who is riding a horse": (  # relative clause: "who" stands for the man
        "a:1:det:DET man:1:ROOT:NOUN who:4:nsubj:PRON is:4:aux:AUX riding:1:relcl:VERB "
        "a:6:det:DET horse:4:dobj:NOUN",
        ["a man", "a horse"], ["man riding horse"]),
    "the ball that the dog chases": (  # the relative pronoun as object: no triple
        "the:1:det:DET ball:1:ROOT:NOUN that:5:dobj:PRON the:4:det:DET dog:5:nsubj:NOUN "
        "chases:1:relcl:VERB",
        ["the ball", "the dog"], []),
    "a man sits and reads a book": (  # a conjoined verb takes the first verb's subject
        "a:1:det:DET man:2:nsubj:NOUN sits:2:ROOT:VERB and:2:cc:CCONJ reads:2:conj:VERB "
        "a:6:det:DET book:4:dobj:NOUN",
        ["a man", "a book"], ["man reads book"]),
    "a cat is on the table": (  # copula with a prepositional phrase
        "a:1:det:DET cat:2:nsubj:NOUN is:2:ROOT:AUX on:2:prep:ADP the:5:det:DET table:3:pobj:NOUN",
        ["a cat", "the table"], ["cat is on table"]),
    "a tennis player picks up a ball": (  # compound in the entity, particle in the relation
        "a:2:det:DET tennis:2:compound:NOUN player:3:nsubj:NOUN picks:3:ROOT:VERB up:3:prt:ADP "
        "a:6:det:DET ball:3:dobj:NOUN",
        ["a tennis player", "a ball"], ["player picks up ball"]),
    "two young men in hats stand near a fountain": (
        "two:2:nummod:NUM young:2:amod:ADJ men:5:nsubj:NOUN in:2:prep:ADP hats:3:pobj:NOUN "
        "stand:5:ROOT:VERB near:5:prep:ADP a:8:det:DET fountain:6:pobj:NOUN",
        ["two young men", "hats", "a fountain"], ["men in hats", "men stand near fountain"]),
    "a brown dog lying on the green grass": (  # participial clause with a preposition
        "a:2:det:DET brown:2:amod:ADJ dog:2:ROOT:NOUN lying:2:acl:VERB on:3:prep:ADP "
        "the:7:det:DET green:7:amod:ADJ grass:4:pobj:NOUN",
        ["a brown dog", "the green grass"], ["dog lying on grass"]),
    "a dog chases the dog": (  # the same label twice in a caption is kept once
        "a:1:det:DET dog:2:nsubj:NOUN chases:2:ROOT:VERB the:4:det:DET dog:2:dobj:NOUN",
        ["a dog"], ["dog chases dog"]),
}


def texts(labels, kind):
    return [label.text for label in labels if label.kind == kind]


@pytest.mark.parametrize("caption", list(PARSES))
def test_entities_and_triples_of_hand_checked_parses(caption):
    spec, entities, triples = PARSES[caption]
    doc = parse(spec)
    assert [t.text for t in doc] == caption.split()
    labels = labels_from_doc(doc, 2)
    assert texts(labels, "entity") == entities
    assert texts(labels, "triple") == triples
    words = caption.split()
    for label in labels:
        assert label.caption == 2
        assert label.words == sorted(set(label.words))
        assert label.text == " ".join(words[i] for i in label.words)


def test_triple_word_positions_read_in_caption_order():
    labels = labels_from_doc(parse(PARSES["a man in a red shirt rides a horse"][0]), 0)
    assert [(label.kind, label.words) for label in labels] == [
        ("entity", [0, 1]), ("entity", [3, 4, 5]), ("entity", [7, 8]),
        ("triple", [1, 2, 5]), ("triple", [1, 6, 8])]


def test_key_ignores_articles_and_case():
    assert Label(0, "entity", [0, 1, 2], "A red shirt").key == "red shirt"
    assert Label(0, "entity", [0, 1, 2], "the red shirt").key == "red shirt"
    assert Label(0, "triple", [1, 2, 3], "man riding horse").key == "man riding horse"
    # punctuation a COCO caption leaves on its words is no part of the identity
    assert Label(0, "entity", [3, 4], "a surfboard.").key == "surfboard"
    assert Label(0, "triple", [1, 3, 5], "kitchen with stove,").key == "kitchen with stove"
    assert Label(0, "entity", [2, 3], "a t-shirt").key == "t-shirt"
    assert Label(0, "entity", [0], ",").key == ""


class FakeParser:
    """Stands in for a spaCy pipeline: returns the hand-made parse of the words it is given."""

    def __init__(self):
        self.vocab = VOCAB
        self.make_doc = BLANK.make_doc  # the extractor parses the tokenizer's tokens
        self.docs = {tuple(caption.split()): spec for caption, (spec, _, _) in PARSES.items()}
        self.calls = 0

    def __call__(self, doc):
        self.calls += 1
        return parse(self.docs[tuple(t.text for t in doc)])

    def pipe(self, docs, **kwargs):
        for doc in docs:
            yield self(doc)


def flickr_record():
    caption = "a man in a red shirt rides a horse"
    return Record(id="f1", image="/img/f1.jpg", captions=[caption, "two dogs play on the beach"],
                  phrases=[Phrase("a man", [[0, 0, 5, 5]], caption=0, start=0),
                           Phrase("a red shirt", [[0, 0, 5, 5]], caption=0, start=3),
                           Phrase("a man in a red shirt", [], caption=0, start=0, type="nobox")])


def test_flickr_phrases_replace_the_entities_of_their_caption_only():
    labels = labels_for_record(flickr_record(), FakeParser())
    first = [label for label in labels if label.caption == 0]
    assert texts(first, "entity") == ["a man", "a red shirt", "a man in a red shirt"]
    assert [label.words for label in first if label.kind == "entity"][2] == [0, 1, 2, 3, 4, 5]
    assert texts(first, "triple") == ["man in shirt", "man rides horse"]  # still from the parse
    second = [label for label in labels if label.caption == 1]
    assert texts(second, "entity") == ["two dogs", "the beach"]  # no Flickr phrases: noun chunks


def test_without_a_parser_flickr_phrases_alone_and_other_captions_fail():
    record = flickr_record()
    record.captions = record.captions[:1]
    labels = labels_for_record(record, None)
    assert texts(labels, "entity") == ["a man", "a red shirt", "a man in a red shirt"]
    assert texts(labels, "triple") == []
    with pytest.raises(ParserNotFoundError, match="python -m spacy download en_core_web_sm"):
        labels_for_record(flickr_record(), None)


def test_flickr_phrase_that_does_not_match_its_caption_is_an_error():
    record = flickr_record()
    record.phrases[1].start = 4
    with pytest.raises(DatasetError, match=r"phrases\[1\]"):
        labels_for_record(record, FakeParser())


def test_a_parser_that_changes_the_words_is_refused():
    class Merging(FakeParser):
        def __call__(self, doc):
            return Doc(VOCAB, words=["a man", "in", "a", "red", "shirt", "rides", "a", "horse"])

    record = Record(id="1", image="/x.jpg", captions=["a man in a red shirt rides a horse"])
    with pytest.raises(DatasetError, match="changed the words"):
        labels_for_record(record, Merging())


def test_labels_round_trip_through_the_manifest(tmp_path):
    record = flickr_record()
    record.image = str(tmp_path / "images" / "f1.jpg")
    record.labels = labels_for_record(record, FakeParser())
    assert list(check_record(record)) == []
    write_manifest([record, Record(id="2", image=str(tmp_path / "b.jpg"), captions=["x"])],
                   tmp_path / "m.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert lines[0]["labels"][0] == {"caption": 0, "kind": "entity", "words": [0, 1], "text": "a man"}
    assert "labels" not in lines[1]  # never labelled: the field stays out
    back = list(read_manifest(tmp_path / "m.jsonl"))
    assert back[0] == record and back[1].labels is None


def test_empty_labels_are_kept_apart_from_no_labels(tmp_path):
    record = Record(id="1", image=str(tmp_path / "a.jpg"), captions=["they run"], labels=[])
    assert record.to_json()["labels"] == []
    assert Record.from_json(record.to_json()).labels == []


GOOD = {"id": "1", "image": "a.jpg", "captions": ["a man rides a red horse", "a dog"]}
GOOD_LABEL = {"caption": 0, "kind": "triple", "words": [1, 2, 5], "text": "man rides horse"}


@pytest.mark.parametrize("labels, field, words", [
    ("x", "labels", "a list"),
    (["x"], "labels[0]", "an object"),
    ([GOOD_LABEL, {**GOOD_LABEL, "colour": 1}], "labels[1].colour", "unknown field"),
    ([{**GOOD_LABEL, "caption": -1}], "labels[0].caption", "non-negative"),
    ([{**GOOD_LABEL, "caption": "0"}], "labels[0].caption", "non-negative"),
    ([{**GOOD_LABEL, "caption": 2}], "labels[0].caption", "caption 2 does not exist"),
    ([{**GOOD_LABEL, "kind": 3}], "labels[0].kind", "entity or triple"),
    ([{**GOOD_LABEL, "kind": "relation"}], "labels[0].kind", "unknown kind 'relation'"),
    ([{k: v for k, v in GOOD_LABEL.items() if k != "words"}], "labels[0].words", "word indices"),
    ([{**GOOD_LABEL, "words": [1, "2"]}], "labels[0].words", "word indices"),
    ([{**GOOD_LABEL, "words": []}], "labels[0].words", "empty"),
    ([{**GOOD_LABEL, "words": [1, 2, 9]}], "labels[0].words",
     "index 9 out of range for caption 0 (6 words)"),
    ([{**GOOD_LABEL, "words": [1, 5, 2]}], "labels[0].words", "not ascending"),
    ([{**GOOD_LABEL, "words": [1, 1, 5]}], "labels[0].words", "not ascending"),
    ([{**GOOD_LABEL, "text": "man rides the horse"}], "labels[0].text", "'man rides horse'"),
    ([{**GOOD_LABEL, "text": None}], "labels[0].text", "a string"),
])
def test_bad_labels_name_the_field_in_the_reader_and_in_check_record(labels, field, words):
    with pytest.raises(RecordError) as info:
        Record.from_json({**GOOD, "labels": labels})
    assert info.value.field == field
    assert words in info.value.message
    if isinstance(labels, list) and isinstance(labels[-1], dict) and set(labels[-1]) == set(GOOD_LABEL):
        raw = labels[-1]
        if isinstance(raw["caption"], int) and isinstance(raw["kind"], str) and isinstance(raw["text"], str) \
                and all(isinstance(w, int) for w in raw["words"]):
            record = Record.from_json(GOOD)
            record.labels = [Label(raw["caption"], raw["kind"], list(raw["words"]), raw["text"])]
            assert field in dict(check_record(record))  # a record built in code: the same field


def test_check_record_lists_every_bad_label():
    record = Record(id="1", image="/x.jpg", captions=["a man rides a red horse"], labels=[
        Label(0, "triple", [1, 2, 5], "man rides horse"),
        Label(1, "entity", [0], "a"),
        Label(0, "relation", [1, 2], "man rides"),
        Label(0, "entity", [4, 3], "red a"),
        Label(0, "entity", [3, 6], "a ?"),
        Label(0, "entity", [4, 5], "red  horse")])
    assert dict(check_record(record)) == {
        "labels[1].caption": "caption 1 does not exist (the record has 1)",
        "labels[2].kind": "unknown kind 'relation' (expected entity or triple)",
        "labels[3].words": "[4, 3] are not ascending and distinct",
        "labels[4].words": "index 6 out of range for caption 0 (6 words)",
        "labels[5].text": "'red  horse' is not caption 0 words [4, 5]: 'red horse'"}


def test_a_good_label_reads_and_checks_clean():
    record = Record.from_json({**GOOD, "labels": [GOOD_LABEL]})
    assert record.labels == [Label(0, "triple", [1, 2, 5], "man rides horse")]
    assert list(check_record(record)) == []
    assert record.to_json()["labels"] == [GOOD_LABEL]


def write_source(tmp_path):
    (tmp_path / "data").mkdir()
    rows = [flickr_record(),
            Record(id="c1", image="/img/c1.jpg",
                   captions=["a woman holding an umbrella", "they are playing in the snow"],
                   labels=[Label(0, "entity", [0], "a")]),  # replaced
            Record(id="c2", image="/img/c2.jpg", captions=["a cat is on the table", "  "])]
    for row in rows:
        row.image = str(tmp_path / "data" / "images" / f"{row.id}.jpg")
    write_manifest(rows, tmp_path / "data" / "m.jsonl")
    return tmp_path / "data" / "m.jsonl"


def test_add_phrase_labels_writes_a_manifest_that_reads_back_with_the_labels(tmp_path):
    source = write_source(tmp_path)
    parser = FakeParser()
    ticks = []
    summary = add_phrase_labels(source, tmp_path / "out" / "labelled.jsonl", nlp=parser,
                                batch_records=2, progress=ticks.append)
    assert (summary.records, summary.captions) == (3, 6) and len(ticks) == 3
    back = {r.id: r for r in read_manifest(tmp_path / "out" / "labelled.jsonl")}
    assert back["c2"].image == str(tmp_path / "data" / "images" / "c2.jpg")  # paths still right
    assert back["f1"].labels == labels_for_record(flickr_record(), FakeParser())
    assert [(x.caption, x.text) for x in back["c1"].labels] == [
        (0, "a woman"), (0, "an umbrella"), (0, "woman holding umbrella"), (1, "the snow")]
    assert texts(back["c2"].labels, "triple") == ["cat is on table"]
    assert summary.entities == sum(len(texts(r.labels, "entity")) for r in back.values())
    assert summary.triples == sum(len(texts(r.labels, "triple")) for r in back.values()) == 5
    for record in back.values():  # (c2's blank caption is its own problem, not a label's)
        assert [f for f, _ in check_record(record) if f.startswith("labels")] == []


def test_add_phrase_labels_without_a_parser_for_plain_captions_writes_nothing(tmp_path):
    source = write_source(tmp_path)
    with pytest.raises(ParserNotFoundError, match="record f1: caption 1 has no Flickr30k phrases"):
        add_phrase_labels(source, tmp_path / "out.jsonl", model=None)
    assert not (tmp_path / "out.jsonl").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "data"]  # no partial file left either


def test_load_parser_names_the_install_commands():
    with pytest.raises(ParserNotFoundError) as info:
        load_parser("no_such_spacy_model_xyz")
    assert "pip install spacy" in str(info.value)
    assert "python -m spacy download en_core_web_sm" in str(info.value)


def test_load_parser_refuses_a_pipeline_without_a_parser(tmp_path):
    spacy.blank("en").to_disk(tmp_path / "blank")
    with pytest.raises(ParserNotFoundError, match="no dependency parser"):
        load_parser(str(tmp_path / "blank"))


def test_a_pipeline_that_does_not_parse_is_refused():
    record = Record(id="1", image="/x.jpg", captions=["a dog runs"])
    with pytest.raises(ParserNotFoundError, match="no dependency labels"):
        labels_for_record(record, spacy.blank("en"))  # a real pipeline, fed a pre-split Doc


def test_cli_without_the_model_is_a_one_line_error(tmp_path):
    source = write_source(tmp_path)
    result = CliRunner().invoke(main, ["datasets", "phrases", str(source), "-o",
                                       str(tmp_path / "out.jsonl"), "--model", "no_such_spacy_model_xyz"])
    assert result.exit_code == 1
    assert "python -m spacy download en_core_web_sm" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_labels_a_manifest(tmp_path, monkeypatch):
    source = write_source(tmp_path)
    monkeypatch.setattr(phrase_labels, "load_parser", lambda name: FakeParser())
    result = CliRunner().invoke(main, ["datasets", "phrases", str(source), "-o", str(tmp_path / "out.jsonl")])
    assert result.exit_code == 0, result.output
    assert "3 records" in result.output and "6 captions" in result.output and "5 triples" in result.output
    assert all(r.labels is not None for r in read_manifest(tmp_path / "out.jsonl"))
