"""``extract text``: run a frozen text encoder once over a manifest's captions into a store.

The driver lays out every sequence from the manifest alone (captions, plus standalone query
phrases that are not among their image's captions), checks lengths before any work starts,
then hands one task per unfinished shard of sequences to dask, as ``extract images`` does.
"""
from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dask
import numpy as np

from multigrounding import __version__
from multigrounding.cache.fingerprint import file_sha256, package_versions
from multigrounding.cache.store import remove_stale_partials, store_bytes, writer_lock
from multigrounding.cache.text_store import TextFeatureStore, TextLayout
from multigrounding.datasets.manifest import iter_manifest
from multigrounding.datasets.records import LABEL_KINDS, Record, RecordError
from multigrounding.errors import DatasetError
from multigrounding.pipeline.extract_images import resolve_device
from multigrounding.pipeline.scheduler import plan_workers, run_tasks

log = logging.getLogger(__name__)

_ENCODERS: dict[tuple, object] = {}
_ENCODERS_LOCK = threading.Lock()


@dataclass
class TextExtraction:
    """Everything ``extract text`` takes (one flat config)."""

    manifest: Path
    cache: Path
    encoder: str = "hf:all-MiniLM-L6-v2"
    elmo_options: Path | None = None
    elmo_weights: Path | None = None
    max_words: int = 64
    shard_size: int = 1024
    token_shard: int = 1024
    batch_size: int = 64
    device: str = "auto"
    scheduler: str = "distributed"
    workers: int | None = None
    overwrite: bool = False
    phrases_alone: bool = False


@dataclass(frozen=True)
class EncoderKey:
    encoder: str
    elmo_options: str | None
    elmo_weights: str | None
    device: str
    max_words: int
    torch_threads: int


@dataclass
class TextShardResult:
    shard: int
    sequences: int
    error: str | None = None
    seconds: float = 0.0


@dataclass
class TextSummary:
    cache: Path
    sequences: int
    captions: int
    phrases: int
    shards: int
    shards_already_done: int
    shards_run: int = 0
    sequences_run: int = 0
    failed_shards: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed_shards


def get_encoder(key: EncoderKey):
    """The text encoder for ``key``, built once per process."""
    with _ENCODERS_LOCK:
        encoder = _ENCODERS.get(key)
        if encoder is None:
            import torch

            from multigrounding.pipeline.text_encoders import create_text_encoder

            torch.set_num_threads(key.torch_threads)
            encoder = create_text_encoder(key.encoder, elmo_options=key.elmo_options,
                                          elmo_weights=key.elmo_weights, device=key.device,
                                          max_words=key.max_words)
            _ENCODERS[key] = encoder
        return encoder


def run_text_shard(store_path: str, shard: int, sentences: list[list[str]], key: EncoderKey,
                   batch_size: int) -> TextShardResult:
    """Encode and write one shard of sequences; never raises (errors come back in the result)."""
    result = TextShardResult(shard=shard, sequences=len(sentences))
    started = time.perf_counter()
    try:
        encoder = get_encoder(key)
        encoded = []
        for first in range(0, len(sentences), batch_size):
            encoded.extend(encoder.encode(sentences[first:first + batch_size]))
        tokens = np.concatenate([e.tokens for e in encoded]).astype(np.float16)
        sentence = np.stack([e.sentence for e in encoded]).astype(np.float16)
        words = [word for sentence_words in sentences for word in sentence_words]
        store = TextFeatureStore.open(store_path, mode="r+")
        store.write_shard(shard, tokens, words, sentence)
    except Exception as exc:  # report, so one bad shard does not stop the others
        log.error("text shard %d failed: %s", shard, traceback.format_exc())
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - started
    return result


def build_layout(manifest: Path, max_words: int, shard_size: int, token_shard: int,
                 phrases_alone: bool = False) -> TextLayout:
    """Every sequence to encode and every phrase's span, from the manifest; refuses bad input.

    ``phrases_alone`` also encodes each in-caption phrase as a sequence of its own (for
    evaluating every phrase as a standalone query), recorded in ``phrases/alone``."""
    image_ids: list[str] = []
    words: list[list[str]] = []
    image: list[int] = []
    is_caption: list[int] = []
    phrases: dict[str, list[int]] = {k: [] for k in ("record", "index", "caption", "start", "length",
                                                     "alone")}
    labels: dict[str, list] = {k: [] for k in ("sequence", "offset", "count", "kind", "words", "key")}
    labelled = False
    problems: list[str] = []
    for number, record in iter_manifest(manifest):
        if isinstance(record, RecordError):
            raise DatasetError(f"{manifest}:{number}: {record.field}: {record.message} "
                               "(run `multigrounding datasets validate` first)")
        row = len(image_ids)
        image_ids.append(record.id)
        first = len(words)
        for i, caption in enumerate(record.captions):
            _add_sequence(caption.split(), row, 1, words, image, is_caption, problems,
                          f"{manifest}:{number}: captions[{i}]", max_words)
        _add_phrases(record, row, first, number, manifest, words, image, is_caption, phrases,
                     problems, max_words, phrases_alone)
        if record.labels is not None:
            labelled = True
            for label in record.labels:
                labels["sequence"].append(first + label.caption)
                labels["offset"].append(len(labels["words"]))
                labels["count"].append(len(label.words))
                labels["kind"].append(LABEL_KINDS.index(label.kind))
                labels["words"].extend(label.words)
                labels["key"].append(label.key)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DatasetError(f"{len(problems)} sequences cannot be encoded:\n  {shown}{more}")
    label_arrays = None
    if labelled:
        label_arrays = {name: np.array(labels[name], dtype) for name, dtype in (
            ("sequence", np.int64), ("offset", np.int64), ("count", np.int32), ("kind", np.uint8),
            ("words", np.int32))}
        label_arrays["key"] = np.array(labels["key"], dtype=object).astype(str)
    return TextLayout(image_ids, words, np.array(image, np.int32), np.array(is_caption, np.uint8),
                      {k: np.array(v, np.int64) for k, v in phrases.items()}, shard_size,
                      token_shard, label_arrays)


def _add_sequence(sequence: list[str], row: int, caption_flag: int, words, image, is_caption,
                  problems, where: str, max_words: int) -> None:
    if not sequence:
        problems.append(f"{where}: empty")
    elif len(sequence) > max_words:
        problems.append(f"{where}: {len(sequence)} words, more than --max-words {max_words}")
    words.append(sequence)
    image.append(row)
    is_caption.append(caption_flag)


def _add_phrases(record: Record, row: int, first: int, number: int, manifest, words, image,
                 is_caption, phrases, problems, max_words: int, phrases_alone: bool) -> None:
    """Each phrase's span: inside its caption, in a caption equal to it, or its own sequence;
    and the sequence that holds it alone (-1 when it is only encoded inside its caption)."""
    by_text = {" ".join(record.captions[i].split()): first + i for i in range(len(record.captions))}

    def alone(index: int, phrase) -> int:
        text = " ".join(phrase.words)
        if text not in by_text:
            by_text[text] = len(words)
            _add_sequence(phrase.words, row, 0, words, image, is_caption, problems,
                          f"{manifest}:{number}: phrases[{index}]", max_words)
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
            phrases[name].append(value)


def extract_text(job: TextExtraction,
                 progress: Callable[[int, int], None] | None = None) -> TextSummary:
    """Encode every sequence not yet in the store; ``progress(done, total)`` after each shard."""
    started = time.perf_counter()
    layout = build_layout(job.manifest, job.max_words, job.shard_size, job.token_shard,
                          job.phrases_alone)
    device = resolve_device(job.device)
    plan = plan_workers(job.scheduler, job.workers, device)
    key = EncoderKey(job.encoder, _str(job.elmo_options), _str(job.elmo_weights), device,
                     job.max_words, plan.torch_threads)
    encoder = get_encoder(key)  # fails fast on a bad name or missing files
    config = text_store_config(job, encoder, layout)
    with writer_lock(job.cache):
        store, resumed = TextFeatureStore.create_or_resume(job.cache, config, layout, job.overwrite)
        if resumed:
            remove_stale_partials(job.cache)
        done = store.done_shards()
        pending = [int(s) for s in np.flatnonzero(~done)]
        summary = TextSummary(job.cache, len(layout.words), int(layout.is_caption.sum()),
                              len(layout.phrases["record"]), store.num_shards, int(done.sum()))
        finished = len(layout.words) - store.items_in(pending)
        if progress is not None:
            progress(finished, len(layout.words))

        def on_result(result: TextShardResult) -> None:
            nonlocal finished
            summary.shards_run += 1
            summary.sequences_run += result.sequences
            if result.error is not None:
                summary.failed_shards.append((result.shard, result.error))
            finished += result.sequences
            if progress is not None:
                progress(finished, len(layout.words))

        def on_error(task_index: int, exc: BaseException) -> None:
            summary.failed_shards.append((pending[task_index], f"{type(exc).__name__}: {exc}"))

        tasks = [dask.delayed(run_text_shard, pure=False, name=f"text-shard-{s}")(
                     str(job.cache), s, layout.words[store.shard_slice(s)], key, job.batch_size)
                 for s in pending]
        run_tasks(tasks, plan, on_result, on_error, warm=(get_encoder, key))
    summary.seconds = time.perf_counter() - started
    summary.bytes = store_bytes(job.cache)
    return summary


def text_store_config(job: TextExtraction, encoder, layout: TextLayout) -> dict:
    return {
        "manifest_path": str(Path(job.manifest).resolve()),
        "manifest": {"sha256": file_sha256(job.manifest), "images": len(layout.image_ids),
                     "sequences": len(layout.words)},
        "encoder": encoder.config(),
        "encoder_files": {"elmo_options": _str(job.elmo_options), "elmo_weights": _str(job.elmo_weights)},
        "num_layers": encoder.num_layers,
        "dim": encoder.dim,
        "num_sentence_vectors": encoder.num_sentence_vectors,
        "words": "caption split on whitespace",
        "max_words": job.max_words,
        "dtype": "float16",
        "shard_size": job.shard_size,
        "token_shard": job.token_shard,
        "versions": {"multigrounding": __version__, **package_versions(("torch", "transformers", "h5py"))},
        # only when set, so stores made before the option keep their fingerprint
        **({"phrases_alone": True} if job.phrases_alone else {}),
    }


def _str(path) -> str | None:
    return None if path is None else str(Path(path).resolve())
