"""Text extraction end to end: flat tokens, spans, standalone queries, limits, resumption."""
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import write_jsonl

from multigrounding.cache.text_store import TextFeatureStore
from multigrounding.cli import main
from multigrounding.datasets.manifest import read_manifest
from multigrounding.datasets.synth import generate_synth
from multigrounding.pipeline.text_encoders import create_text_encoder

ELMO = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "elmo"
ELMO_ARGS = ["--encoder", "elmo", "--elmo-options", str(ELMO / "options.json"),
             "--elmo-weights", str(ELMO / "lm_weights.hdf5")]

RECORDS = [
    {"id": "flickr-like", "image": "a.jpg",
     "captions": ["a man in a red shirt rides a horse", "café crème and naïve 東京 words"],
     "phrases": [{"text": "a man", "caption": 0, "start": 0, "boxes": [[0, 0, 5, 5]]},
                 {"text": "a red shirt", "caption": 0, "start": 3, "boxes": [[0, 0, 5, 5]]},
                 {"text": "東京", "caption": 1, "start": 4, "boxes": [[0, 0, 5, 5]]}]},
    {"id": "referit-like", "image": "b.jpg", "captions": ["man on left"],
     "phrases": [{"text": "man on left", "boxes": [[0, 0, 5, 5]]},          # equals a caption
                 {"text": "the  sky", "boxes": [[0, 0, 5, 5]]},             # a query of its own
                 {"text": "the sky", "boxes": [[1, 1, 5, 5]]}]},            # the same query again
    {"id": "captions-only", "image": "c.jpg", "captions": ["two dogs", "a dog runs on grass"]},
]


def extract(manifest, cache, *extra, encoder=ELMO_ARGS):
    return CliRunner().invoke(main, ["extract", "text", str(manifest), "--cache", str(cache),
                                     *encoder, "--scheduler", "threads", *extra])


@pytest.fixture
def manifest(tmp_path):
    return write_jsonl(tmp_path / "m.jsonl", RECORDS)


def test_layout_spans_and_values_match_the_encoder(manifest, tmp_path):
    result = extract(manifest, tmp_path / "t", "--shard-size", "2")
    assert result.exit_code == 0, result.output
    assert "6 sequences (5 captions, 6 phrases)" in result.output
    store = TextFeatureStore.open(tmp_path / "t")
    group = store.group
    # each image's sequences together: its captions, then its queries that are not captions
    sequences = [c.split() for c in RECORDS[0]["captions"] + RECORDS[1]["captions"]]
    sequences += [["the", "sky"]] + [c.split() for c in RECORDS[2]["captions"]]
    assert list(group["captions/image"][:]) == [0, 0, 1, 1, 2, 2]
    assert list(group["captions/is_caption"][:]) == [1, 1, 1, 0, 1, 1]
    assert list(group["captions/length"][:]) == [len(s) for s in sequences]
    words = group["words"][:]
    encoder = create_text_encoder("elmo", elmo_options=ELMO / "options.json",
                                  elmo_weights=ELMO / "lm_weights.hdf5")
    for row, (sequence, expected) in enumerate(zip(sequences, encoder.encode(sequences))):
        start, length = int(group["captions/start"][row]), int(group["captions/length"][row])
        assert list(words[start:start + length]) == sequence
        np.testing.assert_allclose(store.sequence_tokens(row), expected.tokens, atol=2e-3)
        np.testing.assert_allclose(store.sentence[row], expected.sentence, atol=2e-3)
    # a new shard of sequences starts on a token-shard boundary, so no two tasks share a zarr shard
    token_shard = store.config.token_shard
    assert [int(group["captions/start"][r]) % token_shard for r in (0, 2, 4)] == [0, 0, 0]
    phrases = {name: list(group[f"phrases/{name}"][:]) for name in
               ("record", "index", "caption", "start", "length")}
    assert phrases["record"] == [0, 0, 0, 1, 1, 1]
    assert phrases["caption"] == [0, 0, 1, 2, 3, 3]
    assert phrases["start"] == [0, 3, 4, 0, 0, 0]
    for k in range(6):
        start = int(group["captions/start"][phrases["caption"][k]]) + phrases["start"][k]
        text = [p for r in RECORDS for p in r.get("phrases", [])][k]["text"]
        assert list(words[start:start + phrases["length"][k]]) == text.split()
    verify = CliRunner().invoke(main, ["cache", "verify", str(tmp_path / "t")])
    assert verify.exit_code == 0, verify.output


def test_too_long_or_empty_captions_are_refused_before_any_work(tmp_path):
    rows = [{"id": "1", "image": "a.jpg", "captions": ["word " * 70]},
            {"id": "2", "image": "b.jpg", "captions": ["fine"]}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    result = extract(manifest, tmp_path / "t")
    assert result.exit_code == 1
    assert f"{manifest}:1: image 1: captions[0]: 70 words, more than --max-words 64" in result.output
    assert not (tmp_path / "t").exists()
    assert extract(manifest, tmp_path / "t", "--max-words", "80").exit_code == 0


def test_resume_finishes_only_missing_shards_and_refuses_other_settings(manifest, tmp_path):
    cache = tmp_path / "t"
    assert extract(manifest, cache, "--shard-size", "2").exit_code == 0
    before = TextFeatureStore.open(cache)
    tokens, sentence = before.tokens[:], before.sentence[:]
    writable = TextFeatureStore.open(cache, mode="r+")
    writable.group["done"][1] = 0                     # as if the run had died in shard 1
    writable.tokens[:] = 0 * tokens
    resumed = extract(manifest, cache, "--shard-size", "2")
    assert resumed.exit_code == 0 and "(2 were done before)" in resumed.output
    after = TextFeatureStore.open(cache)
    rows = slice(int(after.group["captions/start"][2]), int(after.group["captions/start"][4]))
    np.testing.assert_array_equal(after.tokens[rows], tokens[rows])   # shard 1 recomputed
    assert not after.tokens[:int(after.group["captions/start"][2])].any()  # shard 0 left alone
    np.testing.assert_array_equal(after.sentence[:], sentence)
    other = extract(manifest, cache, "--shard-size", "2", encoder=["--encoder", "hf:all-MiniLM-L6-v2"])
    assert other.exit_code == 1 and "made with other settings" in other.output
    assert "encoder.name" in other.output


def test_minilm_on_synthetic_captions(tmp_path):
    generate_synth(tmp_path / "data", 4, seed=2, size=64)
    manifest = tmp_path / "data" / "manifest.jsonl"
    result = extract(manifest, tmp_path / "t", encoder=[])      # the default: packaged MiniLM
    assert result.exit_code == 0, result.output
    store = TextFeatureStore.open(tmp_path / "t")
    assert store.tokens.shape[1:] == (7, 384) and store.sentence.shape[1:] == (14, 384)
    captions = [c.split() for r in read_manifest(manifest) for c in r.captions]
    assert store.num_sequences == len(captions)
    expected = create_text_encoder("hf:all-MiniLM-L6-v2").encode(captions[:1])[0]
    np.testing.assert_allclose(store.sequence_tokens(0), expected.tokens, atol=5e-3)
