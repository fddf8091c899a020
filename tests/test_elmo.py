"""The ELMo biLM: parity with allennlp's outputs on the tiny real-format biLM, character ids,
sizes read from the options, padding invariance, and clear errors for files that do not match."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import h5py
import torch

from multigrounding.errors import MultigroundingError
from multigrounding.pipeline.elmo import (
    MAX_CHARACTERS_PER_TOKEN, ElmoBiLM, ElmoFileNotFoundError, ElmoFormatError,
    batch_to_char_ids,
)

FIXTURE = Path(__file__).resolve().parents[2] / "shared/fixtures/elmo"
assert (FIXTURE / "lm_weights.hdf5").is_file(), f"ELMo fixture not found at {FIXTURE} (../shared beside the repo)"


def fixture_sentences() -> list[list[str]]:
    lines = (FIXTURE / "sentences.txt").read_text(encoding="utf-8").splitlines()
    return [line.split() for line in lines if line.strip()]


def reference(i: int) -> torch.Tensor:
    with h5py.File(FIXTURE / "reference_activations.hdf5", "r") as f:
        return torch.from_numpy(f[str(i)][()])


@pytest.fixture(scope="module")
def fixture_model() -> ElmoBiLM:
    return ElmoBiLM.from_files(FIXTURE / "options.json", FIXTURE / "lm_weights.hdf5")


# --------------------------------------------------------------------------- parity


def test_fixture_model_sizes_and_frozen(fixture_model):
    assert fixture_model.num_layers == 3
    assert fixture_model.output_dim == 32
    assert not fixture_model.training
    assert all(not p.requires_grad for p in fixture_model.parameters())
    assert all(p.dtype == torch.float32 for p in fixture_model.parameters())


@pytest.mark.parametrize("i", range(12))
def test_parity_each_sentence_alone(fixture_model, i):
    sentence = fixture_sentences()[i]
    with torch.inference_mode():
        layers, mask = fixture_model(batch_to_char_ids([sentence]))
    expected = reference(i)
    assert layers.shape == (1, 3, len(sentence), 32)
    assert layers.dtype == torch.float32
    assert mask.dtype == torch.bool and mask.all()
    torch.testing.assert_close(layers[0], expected, rtol=0, atol=1e-5)


def test_parity_all_sentences_as_one_padded_batch(fixture_model):
    sentences = fixture_sentences()
    assert len(sentences) == 12
    with torch.inference_mode():
        layers, mask = fixture_model(batch_to_char_ids(sentences))
    t_max = max(map(len, sentences))
    assert layers.shape == (12, 3, t_max, 32) and mask.shape == (12, t_max)
    for i, sentence in enumerate(sentences):
        n = len(sentence)
        assert mask[i, :n].all() and not mask[i, n:].any()
        torch.testing.assert_close(layers[i, :, :n], reference(i), rtol=0, atol=1e-5)
        assert torch.count_nonzero(layers[i, :, n:]) == 0     # padding positions are zero
        with torch.inference_mode():
            alone, _ = fixture_model(batch_to_char_ids([sentence]))
        torch.testing.assert_close(layers[i, :, :n], alone[0], rtol=0, atol=1e-6)


def test_encode_matches_reference_and_gives_ordinary_tensors(fixture_model):
    sentences = fixture_sentences()
    encoded = fixture_model.encode(sentences, batch_size=5)   # several batches, length-grouped
    assert len(encoded) == 12
    for i, tensor in enumerate(encoded):
        assert tensor.dtype == torch.float32 and tensor.shape == (3, len(sentences[i]), 32)
        torch.testing.assert_close(tensor, reference(i), rtol=0, atol=1e-5)
    # Not inference tensors: a trainable layer on top can backpropagate.
    assert not encoded[0].is_inference()
    weight = torch.ones(32, requires_grad=True)
    (encoded[0] @ weight).sum().backward()
    assert weight.grad is not None
    assert fixture_model.encode([]) == []


def test_empty_sentence_beside_real_ones(fixture_model):
    sentences = fixture_sentences()[:3]
    encoded = fixture_model.encode([[], sentences[2], []] + sentences[:2])
    assert encoded[0].shape == (3, 0, 32) and encoded[2].shape == (3, 0, 32)
    torch.testing.assert_close(encoded[1], reference(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(encoded[3], reference(0), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- character ids


def word_ids(*chars: int, max_chars: int = 50) -> list[int]:
    return [c + 1 for c in chars] + [261] * (max_chars - len(chars))


def test_batch_to_char_ids_hand_worked():
    ids = batch_to_char_ids([["ab", "c"], ["x"]])
    assert ids.dtype == torch.int64 and ids.shape == (2, 4, MAX_CHARACTERS_PER_TOKEN)
    bos = word_ids(258, 256, 259)
    eos = word_ids(258, 257, 259)
    assert ids[0, 0].tolist() == bos == [259, 257, 260] + [261] * 47
    assert ids[0, 1].tolist() == word_ids(258, ord("a"), ord("b"), 259)
    assert ids[0, 1, :5].tolist() == [259, 98, 99, 260, 261]
    assert ids[0, 2].tolist() == word_ids(258, ord("c"), 259)
    assert ids[0, 3].tolist() == eos == [259, 258, 260] + [261] * 47
    # The shorter sentence: its end token right after its last word, then an all-zero row.
    assert ids[1, 0].tolist() == bos
    assert ids[1, 1].tolist() == word_ids(258, ord("x"), 259)
    assert ids[1, 2].tolist() == eos
    assert ids[1, 3].tolist() == [0] * 50


def test_batch_to_char_ids_non_ascii_word_uses_utf8_bytes():
    ids = batch_to_char_ids([["café", "日"]])
    assert ids[0, 1].tolist() == word_ids(258, 99, 97, 102, 0xC3, 0xA9, 259)
    assert ids[0, 2].tolist() == word_ids(258, 0xE6, 0x97, 0xA5, 259)


def test_batch_to_char_ids_truncates_long_words_to_max_chars_minus_two_bytes():
    word = "abcdefghij" * 6                                   # 60 bytes
    row = batch_to_char_ids([[word]])[0, 1].tolist()
    assert row == [259] + [b + 1 for b in word.encode()[:48]] + [260]
    row = batch_to_char_ids([["é" * 30]])[0, 1].tolist()      # 60 bytes, cut mid-character
    assert row == [259] + [b + 1 for b in ("é" * 30).encode()[:48]] + [260]
    short = batch_to_char_ids([["abcdefgh"]], max_characters_per_token=6)
    assert short.shape == (1, 3, 6)
    assert short[0, 1].tolist() == [259, 98, 99, 100, 101, 260]


def test_batch_to_char_ids_edge_cases():
    assert batch_to_char_ids([]).shape == (0, 2, 50)
    empty = batch_to_char_ids([[]])
    assert empty.shape == (1, 2, 50) and empty[0, 1].tolist() == word_ids(258, 257, 259)
    with pytest.raises(TypeError, match="split"):
        batch_to_char_ids(["a sentence, not split"])
    with pytest.raises(TypeError):
        batch_to_char_ids("words")


# --------------------------------------------------------------------------- other sizes


def small_options(**lstm_changes) -> dict:
    options = {
        "lstm": {"cell_clip": 3, "use_skip_connections": False, "n_layers": 1, "proj_clip": 3,
                 "projection_dim": 8, "dim": 24},
        "char_cnn": {"embedding": {"dim": 6}, "filters": [[1, 3], [2, 5], [4, 7]],
                     "n_highway": 3, "n_characters": 262, "max_characters_per_token": 20,
                     "activation": "tanh"},
    }
    options["lstm"].update(lstm_changes)
    return options


def write_random_elmo(directory: Path, options: dict, seed: int = 0,
                      scale: float = 0.3) -> tuple[Path, Path]:
    """Options + an hdf5 weight file of random values in the bilm-tf layout."""
    rng = np.random.default_rng(seed)
    lstm, cnn = options["lstm"], options["char_cnn"]
    d, P, H = cnn["embedding"]["dim"], lstm["projection_dim"], lstm["dim"]
    n_filters = sum(n for _, n in cnn["filters"])

    def rand(*shape):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    directory.mkdir(parents=True, exist_ok=True)
    options_file = directory / "options.json"
    options_file.write_text(json.dumps(options))
    weight_file = directory / "weights.hdf5"
    with h5py.File(weight_file, "w") as f:
        f["char_embed"] = rand(cnn["n_characters"] - 1, d)
        for i, (width, count) in enumerate(cnn["filters"]):
            f[f"CNN/W_cnn_{i}"] = rand(1, width, d, count)
            f[f"CNN/b_cnn_{i}"] = rand(count)
        for k in range(cnn["n_highway"]):
            for name, shape in [("W_transform", (n_filters, n_filters)),
                                ("b_transform", (n_filters,)),
                                ("W_carry", (n_filters, n_filters)), ("b_carry", (n_filters,))]:
                f[f"CNN_high_{k}/{name}"] = rand(*shape)
        f["CNN_proj/W_proj"] = rand(n_filters, P)
        f["CNN_proj/b_proj"] = rand(P)
        for direction in range(2):
            for k in range(lstm["n_layers"]):
                cell = f"RNN_{direction}/RNN/MultiRNNCell/Cell{k}/LSTMCell"
                f[f"{cell}/W_0"] = rand(2 * P, 4 * H)
                f[f"{cell}/B"] = rand(4 * H)
                f[f"{cell}/W_P_0"] = rand(H, P)
    return options_file, weight_file


def numpy_elmo(options_file: Path, weight_file: Path, sentence: list[str]) -> np.ndarray:
    """A slow, literal reading of the format, one sentence, loops everywhere: a second opinion."""
    options = json.loads(Path(options_file).read_text())
    lstm, cnn = options["lstm"], options["char_cnn"]
    max_chars = cnn["max_characters_per_token"]
    act = np.tanh if cnn["activation"] == "tanh" else (lambda v: np.maximum(v, 0))
    sigmoid = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    f = h5py.File(weight_file, "r")
    table = np.concatenate([np.zeros((1, cnn["embedding"]["dim"])), f["char_embed"][()]])

    def spell(chars):
        return [c + 1 for c in chars] + [261] * (max_chars - len(chars))

    tokens = ([spell([258, 256, 259])]
              + [spell([258] + list(w.encode()[:max_chars - 2]) + [259]) for w in sentence]
              + [spell([258, 257, 259])])
    embeddings = []
    for token in tokens:
        chars = table[token]                                   # [max_chars, d]
        features = []
        for i, (width, count) in enumerate(cnn["filters"]):
            w, b = f[f"CNN/W_cnn_{i}"][0], f[f"CNN/b_cnn_{i}"][()]
            conv = [sum(chars[p + k] @ w[k] for k in range(width)) + b
                    for p in range(max_chars - width + 1)]
            features.append(act(np.max(conv, axis=0)))
        x = np.concatenate(features)
        for k in range(cnn["n_highway"]):
            g = f[f"CNN_high_{k}"]
            gate = sigmoid(x @ g["W_carry"][()] + g["b_carry"][()])
            transformed = np.maximum(x @ g["W_transform"][()] + g["b_transform"][()], 0)
            x = gate * transformed + (1 - gate) * x
        embeddings.append(x @ f["CNN_proj/W_proj"][()] + f["CNN_proj/b_proj"][()])
    embeddings = np.array(embeddings)
    layers = [np.concatenate([embeddings, embeddings], axis=1)]
    inputs = [embeddings, embeddings[::-1]]
    for k in range(lstm["n_layers"]):
        outputs = []
        for direction in range(2):
            cell = f[f"RNN_{direction}/RNN/MultiRNNCell/Cell{k}/LSTMCell"]
            W, B, WP = cell["W_0"][()], cell["B"][()], cell["W_P_0"][()]
            H = lstm["dim"]
            h, c, out = np.zeros(lstm["projection_dim"]), np.zeros(H), []
            for x in inputs[direction]:
                z = np.concatenate([x, h]) @ W + B
                i, j, fg, o = z[:H], z[H:2 * H], z[2 * H:3 * H], z[3 * H:]
                c = np.clip(sigmoid(fg + 1.0) * c + sigmoid(i) * np.tanh(j),
                            -lstm["cell_clip"], lstm["cell_clip"])
                h = np.clip((sigmoid(o) * np.tanh(c)) @ WP, -lstm["proj_clip"], lstm["proj_clip"])
                out.append(h)
            out = np.array(out)
            if lstm["use_skip_connections"] and k > 0:
                out = out + inputs[direction]
            outputs.append(out)
        inputs = outputs
        layers.append(np.concatenate([outputs[0], outputs[1][::-1]], axis=1))
    f.close()
    return np.stack(layers)[:, 1:-1]


SMALL_SENTENCES = [["a", "tiny", "test"], ["x"], ["naïve", "café", "über", "long" * 9, "!"], []]


def test_sizes_read_from_options_and_padding_invariance(tmp_path):
    options_file, weight_file = write_random_elmo(tmp_path, small_options())
    model = ElmoBiLM.from_files(options_file, weight_file)
    assert model.num_layers == 2 and model.output_dim == 16
    assert model.max_characters_per_token == 20
    char_ids = batch_to_char_ids(SMALL_SENTENCES, 20)
    assert char_ids.shape == (4, 7, 20)
    layers, mask = model(char_ids)
    assert layers.shape == (4, 2, 5, 16) and mask.shape == (4, 5)
    assert mask.sum(1).tolist() == [3, 1, 5, 0]
    # Equal up to float32 rounding (BLAS picks its kernels by batch size): a few ulp of the
    # activations, which the default weight scale keeps around 1.
    for i, sentence in enumerate(SMALL_SENTENCES):
        alone, _ = model(batch_to_char_ids([sentence], 20))
        assert alone.shape == (1, 2, len(sentence), 16)
        torch.testing.assert_close(layers[i, :, :len(sentence)], alone[0], rtol=0, atol=1e-6)
        # Layer 0 is the token embedding twice.
        torch.testing.assert_close(alone[0, 0, :, :8], alone[0, 0, :, 8:], rtol=0, atol=0)
    # The model's own width is enforced.
    with pytest.raises(ValueError, match="max_characters_per_token=20"):
        model(batch_to_char_ids(SMALL_SENTENCES))


@pytest.mark.parametrize("options", [
    small_options(),
    small_options(n_layers=3, use_skip_connections=True, proj_clip=0.5, cell_clip=1.0),
], ids=["1-layer-no-skip", "3-layers-skip"])
def test_matches_a_literal_numpy_reading_on_other_sizes(tmp_path, options):
    options_file, weight_file = write_random_elmo(tmp_path, options, seed=3)
    model = ElmoBiLM.from_files(options_file, weight_file)
    assert model.num_layers == 1 + options["lstm"]["n_layers"]
    layers, _ = model(batch_to_char_ids(SMALL_SENTENCES, 20))
    for i, sentence in enumerate(SMALL_SENTENCES[:3]):
        expected = numpy_elmo(options_file, weight_file, sentence)
        np.testing.assert_allclose(layers[i, :, :len(sentence)].numpy(), expected, rtol=0,
                                   atol=2e-5)
    if options["lstm"]["n_layers"] == 3:
        # The clip is exercised, and the skip connections carry layers 2-3 past it.
        assert layers[:, 1].abs().max() == pytest.approx(0.5)
        assert layers[:, 2:].abs().max() > 0.5


def test_numpy_reading_agrees_with_the_reference_too():
    expected = numpy_elmo(FIXTURE / "options.json", FIXTURE / "lm_weights.hdf5",
                          fixture_sentences()[3])
    np.testing.assert_allclose(expected, reference(3).numpy(), rtol=0, atol=1e-5)


def test_to_device_and_dtype_of_parameters(tmp_path):
    model = ElmoBiLM.from_files(*write_random_elmo(tmp_path, small_options()))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    expected, _ = model(batch_to_char_ids(SMALL_SENTENCES, 20))
    for device in devices:
        moved = model.to(device)
        layers, mask = moved(batch_to_char_ids(SMALL_SENTENCES, 20))
        assert layers.device.type == device and mask.device.type == device
        torch.testing.assert_close(layers.cpu(), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- errors


def copy_fixture(tmp_path: Path) -> tuple[Path, Path]:
    options_file = tmp_path / "options.json"
    weight_file = tmp_path / "weights.hdf5"
    shutil.copyfile(FIXTURE / "options.json", options_file)
    shutil.copyfile(FIXTURE / "lm_weights.hdf5", weight_file)
    weight_file.chmod(0o644)
    return options_file, weight_file


def test_missing_dataset_is_named(tmp_path):
    options_file, weight_file = copy_fixture(tmp_path)
    with h5py.File(weight_file, "a") as f:
        del f["CNN_high_1/W_carry"]
    with pytest.raises(ElmoFormatError) as caught:
        ElmoBiLM.from_files(options_file, weight_file)
    message = str(caught.value)
    assert str(weight_file) in message and "CNN_high_1/W_carry" in message
    assert "missing" in message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, MultigroundingError)


def test_wrong_shape_is_named(tmp_path):
    options_file, weight_file = copy_fixture(tmp_path)
    name = "RNN_1/RNN/MultiRNNCell/Cell1/LSTMCell/W_P_0"
    with h5py.File(weight_file, "a") as f:
        del f[name]
        f[name] = np.zeros((64, 17), np.float32)
    with pytest.raises(ElmoFormatError) as caught:
        ElmoBiLM.from_files(options_file, weight_file)
    message = str(caught.value)
    assert str(weight_file) in message and name in message
    assert "[64, 17]" in message and "[64, 16]" in message


def test_options_that_do_not_match_the_weights(tmp_path):
    options_file, weight_file = copy_fixture(tmp_path)
    options = json.loads(options_file.read_text())
    options["char_cnn"]["n_highway"] = 1                     # the file has two
    options_file.write_text(json.dumps(options))
    with pytest.raises(ElmoFormatError, match="CNN_high_1.*n_highway"):
        ElmoBiLM.from_files(options_file, weight_file)
    options["char_cnn"]["n_highway"] = 2
    options["lstm"]["dim"] = 32
    options_file.write_text(json.dumps(options))
    with pytest.raises(ElmoFormatError, match="Cell0/LSTMCell/W_0.*shape"):
        ElmoBiLM.from_files(options_file, weight_file)
    del options["lstm"]["projection_dim"]
    options_file.write_text(json.dumps(options))
    with pytest.raises(ElmoFormatError) as caught:
        ElmoBiLM.from_files(options_file, weight_file)
    assert str(options_file) in str(caught.value) and "lstm.projection_dim" in str(caught.value)


def test_missing_files_are_named(tmp_path):
    options_file, weight_file = write_random_elmo(tmp_path, small_options())
    for missing, args in [(tmp_path / "nope.json", (tmp_path / "nope.json", weight_file)),
                          (tmp_path / "nope.hdf5", (options_file, tmp_path / "nope.hdf5"))]:
        with pytest.raises(ElmoFileNotFoundError) as caught:
            ElmoBiLM.from_files(*args)
        assert str(missing) in str(caught.value)
        assert isinstance(caught.value, FileNotFoundError)
        assert isinstance(caught.value, ElmoFormatError)


def test_not_hdf5_and_not_json_are_named(tmp_path):
    options_file, weight_file = write_random_elmo(tmp_path, small_options())
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(b"not hdf5 at all")
    with pytest.raises(ElmoFormatError, match="bad.hdf5.*HDF5"):
        ElmoBiLM.from_files(options_file, bad)
    options_file.write_text("{not json")
    with pytest.raises(ElmoFormatError, match="options.json.*JSON"):
        ElmoBiLM.from_files(options_file, weight_file)
