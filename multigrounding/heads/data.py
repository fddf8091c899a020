"""Training batches from the two feature stores: matched image–caption pairs, read ahead.

A batch is B distinct images, each with one of its captions drawn at random (METHOD.md,
"Training"). The draw depends only on (seed, epoch), so a resumed run sees exactly the batches an
uninterrupted one would. A background thread reads the next batches while the model computes.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from multigrounding.cache.location import Location
from multigrounding.cache.reader import TextBatchReader, VisualBatchReader, chunk_cache
from multigrounding.cache.store import CacheIncompleteError, CacheMismatchError
from multigrounding.cache.text_store import Labels


@dataclass
class BatchLabels:
    """The phrase labels of a batch's captions, for the phrase-level loss."""

    caption: np.ndarray           # [Q] the batch position of the label's caption (and image)
    positions: np.ndarray         # [Q, P] its word positions in that caption (0-padded)
    mask: np.ndarray              # [Q, P] bool: real positions
    negative: np.ndarray          # [Q, B] bool: image c is a negative for label q


@dataclass
class Batch:
    image_rows: np.ndarray
    caption_rows: np.ndarray
    visual: list[np.ndarray]      # per level [B, M, M, C_k] float16
    tokens: np.ndarray            # [B, T, layers, dim] float16
    mask: np.ndarray              # [B, T] bool
    sentence: np.ndarray          # [B, S, dim] float16
    labels: BatchLabels | None = None


class PairedCaches:
    """An image store and a text store of the same manifest, both complete, and which captions
    belong to which usable image (failed images and images without captions are left out).
    Either store may be a local folder or an object-store URL; ``storage_options`` reach the
    URLs (and are ignored for folders)."""

    def __init__(self, images: str | Path | Location, text: str | Path | Location,
                 cache_bytes: int = 0, storage_options: dict | None = None):
        cache = chunk_cache(cache_bytes)           # one budget for both stores' decoded chunks
        self.visual = VisualBatchReader(Location.parse(images, storage_options), cache=cache)
        self.text = TextBatchReader(Location.parse(text, storage_options), cache=cache)
        image_store, text_store = self.visual.store, self.text.store
        for store in (image_store, text_store):
            missing = int((~store.done_shards()).sum())
            if missing:
                raise CacheIncompleteError(f"{store.path}: {missing} of {store.num_shards} shards are "
                                           "not extracted; run the extract command again to finish")
        image_sha, text_sha = image_store.config.manifest_sha256, text_store.config.manifest_sha256
        if image_sha != text_sha:
            raise CacheMismatchError(
                f"{images} and {text} were made for different manifests (sha256 {image_sha[:12]}… "
                f"vs {text_sha[:12]}…): extract both from the same manifest")
        captions = text_store.captions()
        rows = captions.usable(image_store.usable())
        order = np.argsort(captions.image[rows], kind="stable")
        rows = rows[order]
        images, starts = np.unique(captions.image[rows], return_index=True)
        self.image_rows = images                                  # usable images with captions
        self.caption_rows = np.split(rows, starts[1:]) if len(rows) else []
        self.image_config = image_store.config
        self.text_config = text_store.config
        labels = text_store.labels()
        self.has_labels = labels is not None
        if labels is not None:
            self._load_labels(labels, captions.image, image_store.num_images)
        self.fingerprints = {"images": image_store.header.fingerprint,
                             "text": text_store.header.fingerprint}

    def __len__(self) -> int:
        return len(self.image_rows)

    def _load_labels(self, labels: Labels, caption_image: np.ndarray, images: int) -> None:
        """Labels by caption (sorted, for searchsorted) and each image's set of label keys over
        all its captions: a label of another image is a negative only if none of them has it."""
        self._label_order = np.argsort(labels.sequence, kind="stable")
        self._label_sequence = labels.sequence[self._label_order]
        self._label_offset = labels.offset
        self._label_count = labels.count
        self._label_words = labels.words
        _, key_ids = np.unique(labels.key, return_inverse=True)
        self._label_key = key_ids
        self.image_keys: list[set[int]] = [set() for _ in range(images)]
        for seq, key in zip(labels.sequence, key_ids):
            self.image_keys[caption_image[seq]].add(int(key))

    def batch_labels(self, image_rows: np.ndarray, caption_rows: np.ndarray) -> BatchLabels:
        """The labels of the batch's captions, and which batch images are negatives for each."""
        found = []
        for b, row in enumerate(caption_rows):
            lo, hi = np.searchsorted(self._label_sequence, [row, row + 1])
            found.extend((b, int(q)) for q in self._label_order[lo:hi])
        width = max((int(self._label_count[q]) for _, q in found), default=1)
        positions = np.zeros((len(found), width), dtype=np.int64)
        mask = np.zeros((len(found), width), dtype=bool)
        negative = np.zeros((len(found), len(image_rows)), dtype=bool)
        for i, (b, q) in enumerate(found):
            first, count = int(self._label_offset[q]), int(self._label_count[q])
            positions[i, :count] = self._label_words[first:first + count]
            mask[i, :count] = True
            key = int(self._label_key[q])
            negative[i] = [c != b and key not in self.image_keys[image] for c, image in enumerate(image_rows)]
        return BatchLabels(np.array([b for b, _ in found], dtype=np.int64), positions, mask, negative)

    def read(self, image_rows: np.ndarray, caption_rows: np.ndarray,
             part: slice = slice(None)) -> Batch:
        """The pairs ``part`` of a batch (one process's share of a global batch; all of it by
        default); the phrase labels are always the whole batch's, which every process scores."""
        visual = self.visual.read(image_rows[part])
        tokens, mask, sentence = self.text.read(caption_rows[part])
        labels = self.batch_labels(image_rows, caption_rows) if self.has_labels else None
        return Batch(image_rows[part], caption_rows[part], visual, tokens, mask, sentence, labels)


def epoch_pairs(caches: PairedCaches, batch_size: int, seed: int, epoch: int
                ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The epoch's batches: (image rows, caption rows), ⌊images / B⌋ of them, no image twice."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(caches))
    choice = rng.random(len(caches))
    batches = []
    for first in range(0, len(order) - batch_size + 1, batch_size):
        picked = order[first:first + batch_size]
        captions = np.array([caches.caption_rows[i][int(choice[i] * len(caches.caption_rows[i]))]
                             for i in picked])
        batches.append((caches.image_rows[picked], captions))
    return batches


class Prefetcher:
    """Reads batches (or each batch's ``part``) on a background thread, ``depth`` ahead; yields
    (batch, seconds waited)."""

    def __init__(self, caches: PairedCaches, pairs: list[tuple[np.ndarray, np.ndarray]],
                 depth: int = 3, part: slice = slice(None)):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(caches, pairs, part), daemon=True)
        self._thread.start()

    def _run(self, caches: PairedCaches, pairs, part: slice) -> None:
        try:
            for image_rows, caption_rows in pairs:
                if self._stop.is_set():
                    return
                self._put(caches.read(image_rows, caption_rows, part))
        except BaseException as exc:  # hand the error to the consumer
            self._put(exc)
        self._put(None)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[Batch, float]]:
        while True:
            started = time.perf_counter()
            item = self._queue.get()
            waited = time.perf_counter() - started
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item, waited

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
