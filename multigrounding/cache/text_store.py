"""The text feature store: every word's encoder layers, flat, plus sentence vectors and spans.

Layout (one zarr v3 group):
  image_ids          (N,) str            the manifest ids, in manifest order
  captions/image     (C,) int32          the image row each sequence belongs to
  captions/is_caption(C,) uint8          1: a manifest caption (training text); 0: a standalone
                                         query phrase that is not among the captions (eval only)
  captions/start     (C,) int64          first row of the sequence in ``tokens``
  captions/length    (C,) int32          its number of words
  tokens             (T, L, D) float16   per word, every encoder layer; one word per inner chunk
  words              (T,) str            the words themselves
  sentence           (C, S, D) float16   the encoder's sentence vectors
  phrases/{record,index,caption,start,length} (P,) int  every manifest phrase: its record row,
                                         its index in the record, the sequence and words it spans
  phrases/alone      (P,) int64          the sequence holding the phrase alone, or -1 (in-caption
                                         phrases are encoded alone only with --phrases-alone)
  labels/{sequence,offset,count,kind} (Q,) int  the phrase labels of the manifest (``datasets
                                         phrases``): the caption sequence, where its word positions
                                         start in ``labels/words`` and how many, 0 entity / 1 triple
  labels/words       (W,) int32          word positions within the caption, label after label
  labels/key         (Q,) str            the label's identity (lowercase, articles dropped)
  done               (n_shards,) uint8   per shard of ``shard_size`` sequences

Tokens are flat, not padded (padding to the longest caption costs 2-3x the space). A shard of
sequences is the unit of work: its tokens start on a token-shard boundary (the few rows up to
the next boundary stay unwritten and cost nothing on disk), so no two tasks ever write the same
zarr shard. Hence ``start``/``length`` rather than a gapless offsets array.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from multigrounding.cache.store import (CacheDamagedError, Header, ShardedStore, VerifyReport,
                                        compressors, every_chunk, read_rows)

KIND = "text"
PHRASE_FIELDS = ("record", "index", "caption", "start", "length")


@dataclass
class TextStoreConfig:
    """A text store's config, as its header records it (``to_json`` keeps the key order).
    ``encoder`` is the encoder's own config (its name, files' sha256, versions)."""

    manifest_path: str
    manifest: dict                  # {"sha256": ..., "images": N, "sequences": C}
    encoder: dict
    encoder_files: dict             # where ELMo's files lay (not fingerprinted)
    num_layers: int
    dim: int
    num_sentence_vectors: int
    words: str
    max_words: int
    dtype: str
    shard_size: int
    token_shard: int
    versions: dict
    phrases_alone: bool = False     # recorded only when set (older stores keep their fingerprint)

    @classmethod
    def from_json(cls, data: dict) -> "TextStoreConfig":
        return cls(**data)

    def to_json(self) -> dict:
        data = {"manifest_path": self.manifest_path, "manifest": self.manifest,
                "encoder": self.encoder, "encoder_files": self.encoder_files,
                "num_layers": self.num_layers, "dim": self.dim,
                "num_sentence_vectors": self.num_sentence_vectors, "words": self.words,
                "max_words": self.max_words, "dtype": self.dtype, "shard_size": self.shard_size,
                "token_shard": self.token_shard, "versions": self.versions}
        if self.phrases_alone:
            data["phrases_alone"] = True
        return data

    @property
    def manifest_sha256(self) -> str:
        return self.manifest["sha256"]

    def identity(self) -> dict:
        """What makes two text stores comparable: the encoder and its weights (not where it lay)."""
        encoder = {k: v for k, v in self.encoder.items() if k not in ("model", "versions")}
        return {"encoder": encoder, "num_layers": self.num_layers, "dim": self.dim}


@dataclass
class Captions:
    """Which image each sequence belongs to, and which sequences are manifest captions."""

    image: np.ndarray               # (C,) int32
    is_caption: np.ndarray          # (C,) bool

    def usable(self, usable_images: np.ndarray) -> np.ndarray:
        """Rows of the captions (training text) whose image is usable (``usable_images`` [N] bool)."""
        return np.flatnonzero(self.is_caption & usable_images[self.image])


@dataclass
class Labels:
    """The phrase labels of the captions (``datasets phrases``): per label its caption sequence,
    word positions (``words[offset:offset+count]``), kind and key."""

    sequence: np.ndarray
    offset: np.ndarray
    count: np.ndarray
    kind: np.ndarray
    words: np.ndarray
    key: np.ndarray


@dataclass
class TextLayout:
    """Everything about the sequences that the manifest alone decides (computed by the driver)."""

    image_ids: list[str]
    words: list[list[str]]           # per sequence
    image: np.ndarray                # (C,) int32
    is_caption: np.ndarray           # (C,) uint8
    phrases: dict[str, np.ndarray]   # record, index, caption, start, length, alone
    shard_size: int
    token_shard: int
    labels: dict[str, np.ndarray] | None = None   # sequence, offset, count, kind, words, key
    image_paths: list[str] = field(default_factory=list)  # not stored: where no cache may go
    sources: list[str] = field(default_factory=list)      # not stored: "MANIFEST:LINE: captions[i]"

    def __post_init__(self):
        lengths = np.array([len(w) for w in self.words], dtype=np.int64)
        self.length = lengths.astype(np.int32)
        self.start = np.zeros(len(self.words), dtype=np.int64)
        base = 0
        for first in range(0, len(self.words), self.shard_size):
            rows = slice(first, first + self.shard_size)
            counts = lengths[rows]
            self.start[rows] = base + np.concatenate([[0], np.cumsum(counts)[:-1]])
            base += -(-int(counts.sum()) // self.token_shard) * self.token_shard
        self.total_tokens = base


class TextFeatureStore(ShardedStore):
    """Reading and writing one text feature store (see the module docstring for the layout).

    ``create_or_resume(path, config, layout)`` takes a TextLayout."""

    KIND = KIND
    CONFIG = TextStoreConfig
    UNIT = "sequences"
    PER_SHARD_ARRAYS = ("sentence",)

    def __init__(self, path: str | Path, group: zarr.Group, header: Header):
        super().__init__(path, group, header)
        self.num_sequences = self.num_items
        self.tokens = group["tokens"]
        self.sentence = group["sentence"]

    def _count_items(self) -> int:
        return self.group["captions/start"].shape[0]

    @classmethod
    def _allocate(cls, group: zarr.Group, config: TextStoreConfig, layout: TextLayout) -> None:
        _allocate(group, config, layout)

    def write_shard(self, shard: int, tokens: np.ndarray, words: list[str],
                    sentence: np.ndarray) -> None:
        """Write one shard's tokens, words and sentence vectors, then its done flag."""
        rows = self.shard_slice(shard)
        first = int(self.group["captions/start"][rows.start])
        if len(words):
            every_chunk(self.tokens)[first:first + len(words)] = tokens
            every_chunk(self.group["words"])[first:first + len(words)] = \
                np.array(words, dtype=object).astype(str)
        every_chunk(self.sentence)[rows] = sentence
        every_chunk(self.group["done"])[shard] = 1

    def progress(self) -> dict:
        done = self.done_shards()
        sequences = self.items_in(np.flatnonzero(done))
        return {"shards_done": int(done.sum()), "shards": self.num_shards,
                "sequences_done": int(sequences), "sequences": self.num_sequences,
                "captions": int(self.group["captions/is_caption"][:].sum()),
                "phrases": int(self.group["phrases/record"].shape[0])}

    # ---------------------------------------------------------------- reading
    def captions(self) -> Captions:
        return Captions(self.group["captions/image"][:],
                        self.group["captions/is_caption"][:].astype(bool))

    def sequence_spans(self) -> tuple[np.ndarray, np.ndarray]:
        """(start, length) of every sequence's words in ``tokens``."""
        return self.group["captions/start"][:], self.group["captions/length"][:]

    def phrase_spans(self) -> dict[str, np.ndarray]:
        """Every manifest phrase: its record row and index, the sequence and words it spans, and
        ``alone`` (the sequence holding it alone, -1 if none; None when the store predates it)."""
        spans = {name: self.group[f"phrases/{name}"][:] for name in PHRASE_FIELDS}
        spans["alone"] = self.group["phrases/alone"][:] if "phrases/alone" in self.group else None
        return spans

    @property
    def has_labels(self) -> bool:
        return "labels" in self.group

    def labels(self) -> Labels | None:
        if not self.has_labels:
            return None
        group = self.group["labels"]
        return Labels(**{name: group[name][:] for name in
                         ("sequence", "offset", "count", "kind", "words", "key")})

    # ---------------------------------------------------------------- verifying
    def _check_layout(self, report: VerifyReport) -> None:
        layers, dim = self.config.num_layers, self.config.dim
        if self.tokens.shape[1:] != (layers, dim) or self.tokens.dtype != np.float16:
            report.problems.append(f"tokens: shape {self.tokens.shape} {self.tokens.dtype}, "
                                   f"config says (T, {layers}, {dim}) float16")
        self._spans = self.sequence_spans()

    def _check_shard(self, shard: int, rows: slice, report: VerifyReport) -> None:
        """Every token and sentence vector of the shard decodes (checksums hold) and is finite."""
        first, last = self.token_range(rows)
        for name, index, describe in (
                ("tokens", np.arange(first, last), self.token_owner),
                ("sentence", np.arange(rows.start, rows.stop), self.item_name)):
            try:
                values = read_rows(self, name, index, describe=describe)
            except CacheDamagedError as exc:
                report.problems.append(exc.detail)
                continue
            if not np.isfinite(values).all():
                report.problems.append(f"shard {shard} {name}: NaN or Inf values")

    # ---------------------------------------------------------------- integrity
    def token_range(self, rows: slice) -> tuple[int, int]:
        """The rows of ``tokens`` the sequences ``rows`` occupy (first, end)."""
        starts, lengths = self._spans if hasattr(self, "_spans") else self.sequence_spans()
        return int(starts[rows.start]), int(starts[rows.stop - 1] + lengths[rows.stop - 1])

    def _extra_chunks(self, shard: int) -> list[tuple[str, int]]:
        """The token shards (and words chunks) of the shard's words: they start on a token-shard
        boundary and no other shard writes them."""
        first, last = self.token_range(self.shard_slice(shard))
        size = self.config.token_shard
        chunks = range(first // size, -(-last // size)) if last > first else range(0)
        return [(name, index) for index in chunks for name in ("tokens", "words")]

    def item_name(self, row: int) -> str:
        image = int(self.group["captions/image"][row])
        return f"sequence {row} (image {self.group['image_ids'][image]})"

    def token_owner(self, token: int) -> str:
        """The sequence a row of ``tokens`` belongs to, for messages."""
        starts, _ = self._spans if hasattr(self, "_spans") else self.sequence_spans()
        return f"a word of {self.item_name(int(np.searchsorted(starts, token, side='right')) - 1)}"

    def sequence_tokens(self, row: int) -> np.ndarray:
        """[words, L, D] float16 of one sequence."""
        start = int(self.group["captions/start"][row])
        length = int(self.group["captions/length"][row])
        return self.tokens[start:start + length]


def _allocate(group: zarr.Group, config: TextStoreConfig, layout: TextLayout) -> None:
    count, layers, dim = len(layout.words), config.num_layers, config.dim
    vectors = config.num_sentence_vectors
    shard, token_shard = layout.shard_size, layout.token_shard
    compressor = compressors(3)
    group.create_array("image_ids", shape=(len(layout.image_ids),), dtype=str,
                       chunks=(max(len(layout.image_ids), 1),), compressors=compressor)
    group["image_ids"][:] = np.array(layout.image_ids, dtype=object).astype(str)
    captions = group.create_group("captions")
    for name, values in (("image", layout.image), ("is_caption", layout.is_caption),
                         ("start", layout.start), ("length", layout.length)):
        captions.create_array(name, shape=values.shape, dtype=values.dtype,
                              chunks=(max(len(values), 1),), compressors=compressor)
        captions[name][:] = values
    phrases = group.create_group("phrases")
    for name, values in layout.phrases.items():
        phrases.create_array(name, shape=values.shape, dtype=values.dtype,
                             chunks=(max(len(values), 1),), compressors=compressor)
        if len(values):
            phrases[name][:] = values
    if layout.labels is not None:
        labels = group.create_group("labels")
        for name, values in layout.labels.items():
            labels.create_array(name, shape=values.shape, dtype=values.dtype if name != "key" else str,
                                chunks=(max(len(values), 1),), compressors=compressor)
            if len(values):
                labels[name][:] = values
    total = max(layout.total_tokens, 1)
    group.create_array("tokens", shape=(total, layers, dim), dtype="float16",
                       chunks=(1, layers, dim), shards=(token_shard, layers, dim),
                       compressors=compressor, fill_value=0)
    group.create_array("words", shape=(total,), dtype=str, chunks=(token_shard,),
                       compressors=compressor)
    group.create_array("sentence", shape=(max(count, 1), vectors, dim), dtype="float16",
                       chunks=(1, vectors, dim), shards=(shard, vectors, dim),
                       compressors=compressor, fill_value=0)
    group.create_array("done", shape=(-(-count // shard),), dtype="uint8", chunks=(1,),
                       compressors=compressor,
                       fill_value=0)


