"""ELMo biLM (Peters et al. 2018) in plain PyTorch, read from the official files.

Loads a bilm-tf model as released: ``options.json`` (the sizes) and ``weights.hdf5`` (read with
h5py), for whatever sizes the options declare. Written from the file format and the paper; it does
not depend on allennlp.

The network, per token of a sentence wrapped in begin/end-of-sentence tokens:

- character ids (UTF-8 bytes between begin/end-of-word marks, see :func:`batch_to_char_ids`) →
  character embeddings → one 1-D convolution per ``filters`` entry over all character slots,
  max over positions, activation → highway layers → linear projection: the token embedding ``e``
  (layer 0, returned as ``[e ; e]``);
- ``n_layers`` LSTM layers with a projected, clipped output, run forward over the sentence and
  backward over each sentence's own tokens, both from a zero state; with skip connections every
  layer after the first adds its input to its output. Layer k is returned as [forward ; backward].

Speed: each direction's input projection is one matmul over all timesteps; each step is one
batched matmul for the four gates of both directions and one for the output projection. The
backward direction runs on per-sentence reversed inputs, so every sentence starts at step 0 in
both directions and padding (always at the end) never reaches a real token.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from multigrounding.errors import MultigroundingError

__all__ = [
    "MAX_CHARACTERS_PER_TOKEN", "ElmoFormatError", "ElmoFileNotFoundError", "batch_to_char_ids",
    "ElmoBiLM",
]

MAX_CHARACTERS_PER_TOKEN = 50

# Character codes before the +1 shift that frees 0 for padding.
BEGIN_SENTENCE_CHAR = 256
END_SENTENCE_CHAR = 257
BEGIN_WORD_CHAR = 258
END_WORD_CHAR = 259
PADDING_CHAR = 260
# Highest id a token can hold after the shift; the character embedding needs a row for each.
_MAX_CHAR_ID = PADDING_CHAR + 1
# Tokens per character-CNN chunk.
_CNN_CHUNK = 2048


class ElmoFormatError(MultigroundingError, ValueError):
    """ELMo options or weights are missing a part, malformed, or do not match each other."""


class ElmoFileNotFoundError(ElmoFormatError, FileNotFoundError):
    """An ELMo options or weight file named by the user does not exist."""


# --------------------------------------------------------------------------- character ids


def _special_token_row(char: int, max_chars: int) -> np.ndarray:
    """A boundary token: spelled as a one-character word of ``char`` (256 begin, 257 end)."""
    row = np.full(max_chars, PADDING_CHAR + 1, dtype=np.int64)
    row[:3] = (BEGIN_WORD_CHAR + 1, char + 1, END_WORD_CHAR + 1)
    return row


def _utf8(words: list, max_bytes: int, sentences: list) -> list[bytes]:
    try:
        return [word.encode("utf-8")[:max_bytes] for word in words]
    except (AttributeError, TypeError):
        for b, sentence in enumerate(sentences):
            for t, word in enumerate(sentence):
                if not isinstance(word, str):
                    raise TypeError(f"sentence {b}, word {t}: expected str, got "
                                    f"{type(word).__name__}") from None
        raise


def batch_to_char_ids(sentences: list[list[str]],
                      max_characters_per_token: int = MAX_CHARACTERS_PER_TOKEN) -> torch.LongTensor:
    """Character ids ``[B, T_max + 2, max_chars]`` with the begin/end-of-sentence tokens.

    Sentence b occupies rows ``0 .. len_b + 1``: its begin token, its words, then its end token
    right after its own last word; rows after that (padding) are all 0. A word's row is
    ``[258, bytes..., 259, 260, ...] + 1`` over its UTF-8 bytes, truncated to
    ``max_characters_per_token - 2`` bytes; the boundary tokens are one-character words of 256
    (begin) and 257 (end). Vectorised over all words of the batch.
    """
    if isinstance(sentences, (str, bytes)):
        raise TypeError("batch_to_char_ids expects a list of sentences, each a list of words; "
                        "got a single string")
    max_chars = int(max_characters_per_token)
    if max_chars < 3:
        raise ValueError(f"max_characters_per_token must be at least 3, got {max_chars}")
    sentences = list(sentences)
    for index, sentence in enumerate(sentences):
        if isinstance(sentence, (str, bytes)):
            raise TypeError(f"sentence {index} is a string, not a list of words: split it first "
                            f"(e.g. {str(sentence)[:30]!r}.split())")
    batch = len(sentences)
    lengths = np.fromiter(map(len, sentences), dtype=np.int64, count=batch)
    width = (int(lengths.max()) if batch else 0) + 2
    out = np.zeros((batch, width, max_chars), dtype=np.int64)
    out[:, 0] = _special_token_row(BEGIN_SENTENCE_CHAR, max_chars)
    out[np.arange(batch), lengths + 1] = _special_token_row(END_SENTENCE_CHAR, max_chars)
    encoded = _utf8([word for sentence in sentences for word in sentence], max_chars - 2,
                    sentences)
    n_words = len(encoded)
    if n_words:
        n_bytes = np.fromiter(map(len, encoded), dtype=np.int64, count=n_words)
        rows = np.full((n_words, max_chars), PADDING_CHAR + 1, dtype=np.int64)
        rows[:, 0] = BEGIN_WORD_CHAR + 1
        data = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.int64)
        word_of_byte = np.repeat(np.arange(n_words), n_bytes)
        first_byte = np.repeat(np.cumsum(n_bytes) - n_bytes, n_bytes)
        rows[word_of_byte, np.arange(len(data)) - first_byte + 1] = data + 1
        rows[np.arange(n_words), n_bytes + 1] = END_WORD_CHAR + 1
        sentence_of_word = np.repeat(np.arange(batch), lengths)
        first_word = np.repeat(np.cumsum(lengths) - lengths, lengths)
        out[sentence_of_word, np.arange(n_words) - first_word + 1] = rows
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- options


def _check_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        where = "is a directory, not a file" if path.is_dir() else "does not exist"
        example = "options.json" if what == "options" else "weights.hdf5"
        raise ElmoFileNotFoundError(f"ELMo {what} file {str(path)!r} {where}; pass the {what} "
                                    f"file of the biLM (e.g. the released *_{example}).")
    return path


def _option(options: dict, source: str, *keys, kind=None, default=None, required=True):
    value = options
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            if not required:
                return default
            raise ElmoFormatError(f"{source}: option {'.'.join(keys[:depth + 1])!r} is missing; "
                                  "an ELMo options file declares lstm.{dim, projection_dim, "
                                  "n_layers, ...} and char_cnn.{filters, n_highway, ...}.")
        value = value[key]
    if kind is not None:
        try:
            if kind is int and (isinstance(value, bool) or float(value) != int(value)):
                raise ValueError
            value = kind(value)
        except (TypeError, ValueError):
            raise ElmoFormatError(f"{source}: option {'.'.join(keys)!r} = {value!r} is not "
                                  f"a valid {kind.__name__}.") from None
    return value


class _ElmoConfig:
    """The sizes an options file declares, validated."""

    def __init__(self, options: dict, source: str = "options"):
        if not isinstance(options, dict):
            raise ElmoFormatError(f"{source}: expected a JSON object with 'lstm' and 'char_cnn'.")
        lstm = ("lstm",)
        cnn = ("char_cnn",)
        self.dim = _option(options, source, *lstm, "dim", kind=int)
        self.projection_dim = _option(options, source, *lstm, "projection_dim", kind=int)
        self.n_layers = _option(options, source, *lstm, "n_layers", kind=int)
        self.cell_clip = _option(options, source, *lstm, "cell_clip", kind=float, required=False)
        self.proj_clip = _option(options, source, *lstm, "proj_clip", kind=float, required=False)
        self.use_skip_connections = bool(_option(options, source, *lstm, "use_skip_connections",
                                                 required=False, default=False))
        filters = _option(options, source, *cnn, "filters")
        try:
            self.filters = [(int(w), int(n)) for w, n in filters]
        except (TypeError, ValueError):
            raise ElmoFormatError(f"{source}: option 'char_cnn.filters' = {filters!r} is not a "
                                  "list of [width, count] pairs.") from None
        self.n_highway = _option(options, source, *cnn, "n_highway", kind=int)
        self.embedding_dim = _option(options, source, *cnn, "embedding", "dim", kind=int)
        self.n_characters = _option(options, source, *cnn, "n_characters", kind=int,
                                    required=False, default=262)
        self.max_characters_per_token = _option(options, source, *cnn, "max_characters_per_token",
                                                kind=int, required=False,
                                                default=MAX_CHARACTERS_PER_TOKEN)
        self.activation = _option(options, source, *cnn, "activation", required=False,
                                  default="relu")
        if self.activation not in ("relu", "tanh"):
            raise ElmoFormatError(f"{source}: option 'char_cnn.activation' = "
                                  f"{self.activation!r}; expected 'relu' or 'tanh'.")
        positive = {"lstm.dim": self.dim, "lstm.projection_dim": self.projection_dim,
                    "lstm.n_layers": self.n_layers, "char_cnn.embedding.dim": self.embedding_dim}
        for name, value in positive.items():
            if value < 1:
                raise ElmoFormatError(f"{source}: option {name!r} = {value} must be positive.")
        if self.n_highway < 0:
            raise ElmoFormatError(f"{source}: option 'char_cnn.n_highway' = {self.n_highway} "
                                  "must not be negative.")
        if not self.filters:
            raise ElmoFormatError(f"{source}: option 'char_cnn.filters' is empty.")
        for width, count in self.filters:
            if width < 1 or count < 1 or width > self.max_characters_per_token:
                raise ElmoFormatError(
                    f"{source}: filter [{width}, {count}] in 'char_cnn.filters' needs a width in "
                    f"1..max_characters_per_token ({self.max_characters_per_token}) and a "
                    "positive count.")
        if self.max_characters_per_token < 3:
            raise ElmoFormatError(f"{source}: option 'char_cnn.max_characters_per_token' = "
                                  f"{self.max_characters_per_token} must be at least 3.")
        # The file stores ids 1..n_characters-1 (id 0 is padding); the ids in use reach 261.
        self.char_rows = self.n_characters - 1
        if self.char_rows < _MAX_CHAR_ID:
            if self.n_characters == _MAX_CHAR_ID:   # bilm-tf's training-time value: 261 rows
                self.char_rows = _MAX_CHAR_ID
            else:
                raise ElmoFormatError(f"{source}: option 'char_cnn.n_characters' = "
                                      f"{self.n_characters}; ELMo's character ids need 262.")
        self.n_filters = sum(count for _, count in self.filters)


# --------------------------------------------------------------------------- model


class ElmoBiLM(nn.Module):
    """The ELMo biLM: character CNN token embeddings and a 2-direction projected LSTM stack.

    Build with :meth:`from_files`. ``forward(char_ids)`` takes :func:`batch_to_char_ids` output and
    returns ``(layers [B, num_layers, T_max, output_dim], mask [B, T_max])`` with the sentence
    boundaries removed and padding positions zero. Parameters are frozen (``requires_grad``
    False); the model computes on the device of its parameters, in float32.
    """

    def __init__(self, options: dict, source: str = "options"):
        super().__init__()
        cfg = _ElmoConfig(options, source)
        self.config = cfg
        self.options = options
        self.num_layers = 1 + cfg.n_layers
        self.output_dim = 2 * cfg.projection_dim
        self.projection_dim = cfg.projection_dim
        self.max_characters_per_token = cfg.max_characters_per_token

        def param(*shape):
            return nn.Parameter(torch.zeros(*shape, dtype=torch.float32), requires_grad=False)

        P, H, Fn = cfg.projection_dim, cfg.dim, cfg.n_filters
        # Row 0 is the padding id: stays zero.
        self.char_embed = param(cfg.char_rows + 1, cfg.embedding_dim)
        self.conv_weights = nn.ParameterList(
            [param(count, cfg.embedding_dim, width) for width, count in cfg.filters])
        self.conv_biases = nn.ParameterList([param(count) for _, count in cfg.filters])
        # Highway: [W_transform | W_carry] fused, so one matmul per layer.
        self.highway_weights = nn.ParameterList([param(Fn, 2 * Fn) for _ in range(cfg.n_highway)])
        self.highway_biases = nn.ParameterList([param(2 * Fn) for _ in range(cfg.n_highway)])
        self.proj_weight = param(Fn, P)
        self.proj_bias = param(P)
        # LSTM, direction-stacked ([forward, backward]); gate columns reordered to i, f, o, j and
        # the forget bias of 1.0 folded into the bias.
        layers = range(cfg.n_layers)
        self.lstm_input_weights = nn.ParameterList([param(2, P, 4 * H) for _ in layers])
        self.lstm_state_weights = nn.ParameterList([param(2, P, 4 * H) for _ in layers])
        self.lstm_biases = nn.ParameterList([param(2, 1, 4 * H) for _ in layers])
        self.lstm_proj_weights = nn.ParameterList([param(2, H, P) for _ in layers])
        self.requires_grad_(False)

    # ----------------------------------------------------------------- loading

    @classmethod
    def from_files(cls, options_file, weight_file) -> "ElmoBiLM":
        """Read ``options.json`` and the bilm-tf ``weights.hdf5``; eval mode, frozen, on CPU."""
        options_path = _check_file(options_file, "options")
        weight_path = _check_file(weight_file, "weights")
        try:
            options = json.loads(options_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ElmoFormatError(f"{options_path}: not a JSON options file ({error}).") from None
        model = cls(options, source=str(options_path))
        model._load_weights(weight_path)
        model.eval()
        model.requires_grad_(False)
        return model

    def _load_weights(self, weight_path: Path) -> None:
        try:
            import h5py
        except ModuleNotFoundError:
            raise ElmoFormatError("reading ELMo weight files needs h5py: "
                                  "pip install 'multigrounding[elmo]'") from None

        cfg = self.config
        try:
            handle = h5py.File(weight_path, "r")
        except OSError as error:
            raise ElmoFormatError(f"{weight_path}: not a readable HDF5 weight file ({error}).") \
                from None
        with handle as f:
            def read(name: str, shape: tuple, why: str) -> torch.Tensor:
                node = f.get(name)
                if node is None:
                    raise ElmoFormatError(
                        f"{weight_path}: dataset {name!r} is missing (expected shape "
                        f"{list(shape)}; {why}). Check that the options and weight files belong "
                        "to the same biLM.")
                if not isinstance(node, h5py.Dataset):
                    raise ElmoFormatError(f"{weight_path}: {name!r} is a group, not a dataset.")
                if tuple(node.shape) != tuple(shape):
                    raise ElmoFormatError(
                        f"{weight_path}: dataset {name!r} has shape {list(node.shape)}, expected "
                        f"{list(shape)} ({why}). Check that the options and weight files belong "
                        "to the same biLM.")
                return torch.from_numpy(np.asarray(node[()], dtype=np.float32))

            def refuse_extra(name: str, option: str) -> None:
                if name in f:
                    raise ElmoFormatError(
                        f"{weight_path}: has {name!r}, more than {option} declares in the "
                        "options; the options and weight files do not belong together.")

            P, H, Fn, d = cfg.projection_dim, cfg.dim, cfg.n_filters, cfg.embedding_dim
            opt = f"from char_cnn.embedding.dim={d}, n_characters={cfg.n_characters}"
            self.char_embed.data[1:] = read("char_embed", (cfg.char_rows, d), opt)
            for i, (width, count) in enumerate(cfg.filters):
                why = f"filter {i} = [{width}, {count}] of char_cnn.filters, embedding dim {d}"
                w = read(f"CNN/W_cnn_{i}", (1, width, d, count), why)
                # [1, width, d, n] → conv1d's [n, d, width]; conv1d is a cross-correlation as in
                # TF (kernel row k meets character p + k, no flip), over all slots, no padding.
                self.conv_weights[i].data.copy_(w[0].permute(2, 1, 0))
                self.conv_biases[i].data.copy_(read(f"CNN/b_cnn_{i}", (count,), why))
            refuse_extra(f"CNN/W_cnn_{len(cfg.filters)}", "char_cnn.filters")
            for k in range(cfg.n_highway):
                why = f"highway layer {k} of n_highway={cfg.n_highway}, {Fn} filters in all"
                group = f"CNN_high_{k}"
                w_t = read(f"{group}/W_transform", (Fn, Fn), why)
                w_c = read(f"{group}/W_carry", (Fn, Fn), why)
                b_t = read(f"{group}/b_transform", (Fn,), why)
                b_c = read(f"{group}/b_carry", (Fn,), why)
                self.highway_weights[k].data.copy_(torch.cat([w_t, w_c], dim=1))
                self.highway_biases[k].data.copy_(torch.cat([b_t, b_c]))
            refuse_extra(f"CNN_high_{cfg.n_highway}", "char_cnn.n_highway")
            why = f"{Fn} filters to lstm.projection_dim={P}"
            self.proj_weight.data.copy_(read("CNN_proj/W_proj", (Fn, P), why))
            self.proj_bias.data.copy_(read("CNN_proj/b_proj", (P,), why))
            # TF gate order i, j, f, o → ours i, f, o, j.
            order = torch.cat([torch.arange(0, H), torch.arange(2 * H, 3 * H),
                               torch.arange(3 * H, 4 * H), torch.arange(H, 2 * H)])
            for direction in range(2):
                for k in range(cfg.n_layers):
                    cell = f"RNN_{direction}/RNN/MultiRNNCell/Cell{k}/LSTMCell"
                    why = (f"LSTM layer {k} of n_layers={cfg.n_layers}, "
                           f"{'forward' if direction == 0 else 'backward'}, dim={H}, "
                           f"projection_dim={P}")
                    w = read(f"{cell}/W_0", (P + P, 4 * H), why)[:, order]
                    b = read(f"{cell}/B", (4 * H,), why)[order]
                    b[H:2 * H] += 1.0   # TensorFlow's forget bias
                    self.lstm_input_weights[k].data[direction] = w[:P]
                    self.lstm_state_weights[k].data[direction] = w[P:]
                    self.lstm_biases[k].data[direction, 0] = b
                    self.lstm_proj_weights[k].data[direction] = read(f"{cell}/W_P_0", (H, P), why)
                refuse_extra(f"RNN_{direction}/RNN/MultiRNNCell/Cell{cfg.n_layers}",
                             "lstm.n_layers")

    # ----------------------------------------------------------------- computation

    def _token_embedding(self, char_ids: torch.Tensor) -> torch.Tensor:
        """[N, max_chars] character ids of real tokens → [N, projection_dim]."""
        if len(char_ids) > _CNN_CHUNK:   # bounds the [tokens, positions, filters] intermediate
            return torch.cat([self._token_embedding(part)
                              for part in char_ids.split(_CNN_CHUNK)])
        # conv1d (not unfold + matmul): its result for a token does not depend on the other
        # tokens of the batch (unfold + matmul drifts by an ulp with the batch size), which keeps
        # batched = alone far inside 1e-6.
        x = F.embedding(char_ids, self.char_embed).transpose(1, 2)   # [N, d, max_chars]
        activation = torch.relu if self.config.activation == "relu" else torch.tanh
        pooled = [activation(F.conv1d(x, w, b).amax(dim=-1))
                  for w, b in zip(self.conv_weights, self.conv_biases)]
        x = torch.cat(pooled, dim=-1)
        n = x.shape[-1]
        for w, b in zip(self.highway_weights, self.highway_biases):
            both = torch.addmm(b, x, w)
            transformed = torch.relu(both[:, :n])
            gate = torch.sigmoid(both[:, n:])
            x = torch.lerp(x, transformed, gate)   # g·relu(x W_t + b_t) + (1 − g)·x
        return torch.addmm(self.proj_bias, x, self.proj_weight)

    def _lstm_layer(self, k: int, x: torch.Tensor, steps: int) -> torch.Tensor:
        """One layer, both directions: x [T, 2, B, P] (time-major, direction-aligned) → same."""
        T, _, B, P = x.shape
        H = self.config.dim
        w_in, w_state = self.lstm_input_weights[k], self.lstm_state_weights[k]
        bias, w_proj = self.lstm_biases[k], self.lstm_proj_weights[k]
        cell_clip, proj_clip = self.config.cell_clip, self.config.proj_clip
        # Input projection of every timestep at once, per direction: [2, T·B, 4H].
        inputs = torch.baddbmm(bias, x[:steps].transpose(0, 1).reshape(2, steps * B, P), w_in)
        inputs = inputs.view(2, steps, B, 4 * H)
        out = x.new_zeros(T, 2, B, P)
        h = x.new_zeros(2, B, P)
        c = x.new_zeros(2, B, H)
        for t in range(steps):
            gates = torch.baddbmm(inputs[:, t], h, w_state)       # [2, B, 4H]: i, f, o, j
            sig = torch.sigmoid(gates[..., :3 * H])
            c = torch.addcmul(sig[..., H:2 * H] * c, sig[..., :H], torch.tanh(gates[..., 3 * H:]))
            if cell_clip is not None:
                c = c.clamp_(-cell_clip, cell_clip)
            h = torch.bmm(sig[..., 2 * H:] * torch.tanh(c), w_proj)
            if proj_clip is not None:
                h = h.clamp_(-proj_clip, proj_clip)
            out[t] = h
        return out

    def forward(self, char_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.BoolTensor]:
        """char_ids [B, T_max + 2, max_chars] → (layers [B, num_layers, T_max, output_dim],
        mask [B, T_max]). Boundary tokens removed; padding positions are zero."""
        if not isinstance(char_ids, torch.Tensor) or char_ids.dim() != 3:
            raise ValueError("char_ids must be a [batch, tokens, characters] tensor from "
                             "batch_to_char_ids")
        if char_ids.shape[-1] != self.max_characters_per_token:
            raise ValueError(f"char_ids have {char_ids.shape[-1]} characters per token; this "
                             f"biLM's options declare max_characters_per_token="
                             f"{self.max_characters_per_token}")
        device = self.char_embed.device
        char_ids = char_ids.to(device=device, dtype=torch.long)
        B, T2, _ = char_ids.shape
        P = self.projection_dim
        token_mask = (char_ids > 0).any(dim=-1)                      # [B, T2]
        lengths = token_mask.sum(dim=1)                              # incl. boundaries
        positions = torch.arange(T2, device=device)
        if not torch.equal(token_mask, positions < lengths[:, None]):
            raise ValueError("char_ids have an all-padding token inside a sentence; build them "
                             "with batch_to_char_ids (padding only after each end token)")
        if char_ids.numel() and (char_ids.min() < 0 or char_ids.max() >= len(self.char_embed)):
            raise ValueError(f"char_ids hold ids outside 0..{len(self.char_embed) - 1}")
        steps = int(lengths.max()) if B else 0

        # The character CNN runs once per distinct token of the batch (boundary tokens and
        # frequent words repeat a lot), never on padding.
        distinct, inverse = torch.unique(char_ids[token_mask], dim=0, return_inverse=True)
        embedded = char_ids.new_zeros(B, T2, P, dtype=self.char_embed.dtype)
        embedded[token_mask] = self._token_embedding(distinct)[inverse]

        # Reverse each sentence's own tokens (boundaries included); padding stays in place.
        reverse = torch.where(positions < lengths[:, None], lengths[:, None] - 1 - positions,
                              positions)                              # [B, T2], an involution
        reverse_index = reverse[:, :, None].expand(B, T2, P)
        x = torch.stack([embedded, embedded.gather(1, reverse_index)]).permute(2, 0, 1, 3)
        layers = [torch.cat([embedded, embedded], dim=-1)]
        for k in range(self.config.n_layers):
            out = self._lstm_layer(k, x, steps)                      # [T2, 2, B, P]
            if self.config.use_skip_connections and k > 0:
                out = out + x
            x = out
            forward_out = out[:, 0].transpose(0, 1)                  # [B, T2, P]
            backward_out = out[:, 1].transpose(0, 1).gather(1, reverse_index)
            layers.append(torch.cat([forward_out, backward_out], dim=-1))
        stacked = torch.stack(layers, dim=1)                         # [B, L, T2, 2P]
        n_words = (lengths - 2).clamp_(min=0)
        mask = positions[: max(T2 - 2, 0)] < n_words[:, None]        # [B, T_max]
        result = stacked[:, :, 1:T2 - 1] * mask[:, None, :, None]
        return result, mask

    @torch.no_grad()
    def encode(self, sentences: list[list[str]], *, batch_size: int = 64) -> list[torch.Tensor]:
        """One float32 tensor [num_layers, n_words, output_dim] per sentence, in input order.

        Sentences are batched ``batch_size`` at a time, grouped by length to limit padding, under
        ``torch.inference_mode``; the returned tensors are ordinary (non-inference) tensors on the
        model's device, safe to feed to trainable layers.
        """
        if isinstance(sentences, (str, bytes)):
            raise TypeError("encode expects a list of sentences, each a list of words")
        sentences = list(sentences)
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]), reverse=True)
        results: list[torch.Tensor | None] = [None] * len(sentences)
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            char_ids = batch_to_char_ids([sentences[i] for i in chunk],
                                         self.max_characters_per_token)
            with torch.inference_mode():
                layers, _ = self(char_ids)
            # Cloned outside inference mode: inference tensors cannot be saved for backward.
            for row, index in enumerate(chunk):
                results[index] = layers[row, :, :len(sentences[index])].clone()
        return results

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"filters={cfg.filters}, n_highway={cfg.n_highway}, "
                f"projection_dim={cfg.projection_dim}, dim={cfg.dim}, n_layers={cfg.n_layers}, "
                f"skip={cfg.use_skip_connections}, output_dim={self.output_dim}")
