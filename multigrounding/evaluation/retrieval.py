"""Image–caption retrieval: Recall@K, median and mean rank in both directions, the COCO 1K
protocol, and the caption × image score matrix they are computed from.

Scores are ``[C, I]`` (caption c against image i, higher is better) with ``caption_image[c]`` the
column of caption c's own image. Ranks are 1-based and ties count *against* the query: a rank is
1 + the number of wrong candidates scoring at least as high as the right answer. A model that gives
every pair the same score (e.g. all heatmaps zero) therefore ranks last, never first: a degenerate
model cannot look good, and no tie-breaking order is needed. With real-valued scores ties are rare.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
import torch

from multigrounding.errors import MultigroundingError, UnknownNameError
from multigrounding.heads.inference import map_images, map_text
from multigrounding.heads.scores import cross_scores, heatmap_kind

log = logging.getLogger(__name__)

TERMS = ("both", "word", "sentence")
# Mapped caption blocks are kept across image blocks while they fit in this many bytes; the
# rest are read and mapped again for every image block.
CAPTION_CACHE_BYTES = 512 << 20
# Ranks are counted this many score cells at a time (bounds the boolean comparison matrix).
RANK_CELLS = 1 << 24


class RetrievalError(MultigroundingError, ValueError):
    """Scores or caption→image indices that retrieval metrics cannot be computed from."""


# ------------------------------------------------------------------------------------ metrics
def _check_inputs(scores, caption_image, ks) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """Validated ``(scores [C, I], caption_image [C] int64, ks)``."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise RetrievalError(f"scores must be a 2-D [captions, images] matrix; got shape "
                             f"{list(scores.shape)}")
    if not (np.issubdtype(scores.dtype, np.integer) or np.issubdtype(scores.dtype, np.floating)):
        raise RetrievalError(f"scores must be real numbers; got dtype {scores.dtype}")
    captions, images = scores.shape
    if captions == 0:
        raise RetrievalError(f"scores has no captions (shape {list(scores.shape)}); retrieval "
                             f"needs at least one caption")
    caption_image = np.asarray(caption_image)
    if caption_image.ndim != 1 or len(caption_image) != captions:
        raise RetrievalError(f"caption_image must hold one image column per caption: "
                             f"{captions} for scores {list(scores.shape)}; got shape "
                             f"{list(caption_image.shape)}")
    if not np.issubdtype(caption_image.dtype, np.integer):
        raise RetrievalError(f"caption_image must be integer column indices; got dtype "
                             f"{caption_image.dtype}")
    bad = np.flatnonzero((caption_image < 0) | (caption_image >= images))
    if bad.size:
        raise RetrievalError(f"caption_image must be in [0, {images}) (the image columns of "
                             f"scores); caption(s) {bad[:10].tolist()} point at "
                             f"{caption_image[bad[:10]].tolist()}")
    if np.issubdtype(scores.dtype, np.floating):
        nan_rows = np.flatnonzero(np.isnan(scores).any(axis=1))
        if nan_rows.size:
            raise RetrievalError(f"scores contain NaN (caption rows {nan_rows[:10].tolist()}); "
                                 f"ranks are undefined — check the model or the features")
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1
                     for k in ks):
        raise RetrievalError(f"ks must be positive integers such as (1, 5, 10); got {ks!r}")
    return scores, caption_image.astype(np.int64), tuple(int(k) for k in ks)


def _count_at_least(candidates: np.ndarray, reference: np.ndarray, axis: int) -> np.ndarray:
    """Per query, how many candidates score at least its reference score.

    ``axis=1``: queries are rows (``reference [C]``); ``axis=0``: queries are columns
    (``reference [Q]``). Done in slices so the boolean comparison stays small.
    """
    queries = candidates.shape[1 - axis]
    step = max(RANK_CELLS // max(candidates.shape[axis], 1), 1)
    counts = np.empty(queries, dtype=np.int64)
    for q0 in range(0, queries, step):
        q1 = min(q0 + step, queries)
        if axis == 1:
            counts[q0:q1] = (candidates[q0:q1] >= reference[q0:q1, None]).sum(axis=1)
        else:
            counts[q0:q1] = (candidates[:, q0:q1] >= reference[None, q0:q1]).sum(axis=0)
    return counts


def _summarise(ranks: np.ndarray, ks: tuple[int, ...]) -> dict:
    """Recall@K in percent, median and mean of 1-based ranks.

    The median is the plain one (a half-integer for an even count; VSE++ floors it)."""
    summary = {f"r{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    summary["median_rank"] = float(np.median(ranks))
    summary["mean_rank"] = float(np.mean(ranks))
    return summary


def retrieval_metrics(scores: np.ndarray, caption_image: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Text→image and image→text Recall@K (percent), median and mean rank, and their rsum.

    Text→image ranks each caption's own image among all I images. Image→text ranks, for each
    image that has captions, its best-placed own caption among all C captions (found at K if any
    of its captions is in the top K); an image without captions is only a distractor. Ties
    count against the query (module docstring).
    """
    scores, caption_image, ks = _check_inputs(scores, caption_image, ks)
    captions, images = scores.shape
    own = scores[np.arange(captions), caption_image]
    text_ranks = _count_at_least(scores, own, axis=1)          # the own image counts itself once

    best_own = np.full(images, -np.inf)
    np.maximum.at(best_own, caption_image, own.astype(np.float64))
    described = np.flatnonzero(np.bincount(caption_image, minlength=images) > 0)
    own_ties = np.zeros(images, dtype=np.int64)   # own captions tied with the best own one
    np.add.at(own_ties, caption_image, own >= best_own[caption_image])
    image_ranks = 1 + _count_at_least(scores[:, described], best_own[described], axis=0) \
        - own_ties[described]

    text_to_image, image_to_text = _summarise(text_ranks, ks), _summarise(image_ranks, ks)
    rsum = sum(text_to_image[f"r{k}"] + image_to_text[f"r{k}"] for k in ks)
    return {"text_to_image": text_to_image, "image_to_text": image_to_text,
            "rsum": float(rsum), "captions": captions, "images": images}


def _mean_of(results: list) -> dict | float:
    """Element-wise mean of equally shaped (nested) dicts of numbers."""
    if isinstance(results[0], dict):
        return {key: _mean_of([r[key] for r in results]) for key in results[0]}
    return float(np.mean(results))


def fold_metrics(scores: np.ndarray, caption_image: np.ndarray, fold_size: int = 1000,
                 ks=(1, 5, 10)) -> dict:
    """The COCO 1K protocol: ``retrieval_metrics`` on consecutive folds of ``fold_size`` images
    (and their captions), averaged over folds, plus ``folds`` and ``dropped_images``.

    A last partial fold is dropped (it would be an easier test) unless it is the only fold.
    """
    scores, caption_image, ks = _check_inputs(scores, caption_image, ks)
    if isinstance(fold_size, bool) or not isinstance(fold_size, (int, np.integer)) or fold_size < 1:
        raise RetrievalError(f"fold_size must be a positive number of images; got {fold_size!r}")
    images = scores.shape[1]
    folds = max(images // fold_size, 1)
    width = min(fold_size, images)
    dropped = images - folds * width
    if dropped:
        log.warning("fold_metrics: %d images after the last full fold of %d are left out",
                    dropped, fold_size)
    results = []
    for fold in range(folds):
        first = fold * width
        rows = np.flatnonzero((caption_image >= first) & (caption_image < first + width))
        if rows.size == 0:
            raise RetrievalError(f"fold {fold} (images {first}..{first + width - 1}) has no "
                                 f"captions; every fold needs at least one")
        results.append(retrieval_metrics(scores[rows, first:first + width],
                                         caption_image[rows] - first, ks))
    summary = _mean_of(results)
    summary["folds"] = folds
    summary["dropped_images"] = dropped
    return summary


# ------------------------------------------------------------------------------- score matrix
def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise RetrievalError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@torch.no_grad()
def score_matrix(heads, visual_reader, text_reader, image_rows: Sequence[int],
                 caption_rows: Sequence[int], *, terms: str = "both", gamma1: float = 5.0,
                 heatmap: str = "relu", device: str = "cpu", image_block: int = 64,
                 caption_block: int = 256, progress: Callable[[int], None] | None = None
                 ) -> np.ndarray:
    """Scores ``[len(caption_rows), len(image_rows)]`` (float32) of every caption against every
    image: ``R_w + R_s`` (``terms="both"``), ``R_w`` ("word") or ``R_s`` ("sentence").

    Memory is bounded by the blocks, never by C × I × T × N × L: each image block is read and
    mapped once, then scored against every caption block. Mapped caption blocks are kept across
    image blocks while their total stays under ``CAPTION_CACHE_BYTES`` (a 5K test set's sentence
    vectors always fit, its word vectors at D = 1024 do not); blocks beyond the budget are read
    and mapped again for each image block, which costs text reads but keeps memory flat. The
    heads must already be on ``device``; they run in eval mode (their mode is restored after).
    ``progress(n)`` gets the number of caption–image pairs done after each block.
    """
    if terms not in TERMS:
        raise UnknownNameError("terms", str(terms), TERMS)
    heatmap_kind(heatmap)
    image_block = _positive("image_block", image_block)
    caption_block = _positive("caption_block", caption_block)
    image_rows = np.asarray(image_rows, dtype=np.int64).reshape(-1)
    caption_rows = np.asarray(caption_rows, dtype=np.int64).reshape(-1)
    use_words, use_sentence = terms in ("both", "word"), terms in ("both", "sentence")
    result = np.zeros((len(caption_rows), len(image_rows)), dtype=np.float32)
    if result.size == 0:
        return result

    def map_captions(rows: np.ndarray):
        tokens, mask, sentence = text_reader.read(rows)
        words, sentence = map_text(heads, tokens if use_words else None,
                                   sentence if use_sentence else None, device)
        mask = torch.from_numpy(np.asarray(mask, dtype=bool)).to(device) if use_words else None
        return words, mask, sentence

    cache: dict[int, tuple] = {}
    cached_bytes, cache_full = 0, False
    was_training = heads.training
    heads.eval()
    try:
        for i0 in range(0, len(image_rows), image_block):
            i1 = min(i0 + image_block, len(image_rows))
            levels = visual_reader.read(image_rows[i0:i1])
            visual = map_images(heads, levels, device)
            for c0 in range(0, len(caption_rows), caption_block):
                c1 = min(c0 + caption_block, len(caption_rows))
                mapped = cache.get(c0)
                if mapped is None:
                    mapped = map_captions(caption_rows[c0:c1])
                    size = _nbytes(*mapped)
                    if not cache_full and cached_bytes + size <= CAPTION_CACHE_BYTES:
                        cache[c0], cached_bytes = mapped, cached_bytes + size
                    else:
                        cache_full = True        # keep a prefix; later blocks are re-read
                words, mask, sentence = mapped
                word_scores, sentence_scores = cross_scores(words, mask, sentence, visual,
                                                            gamma1=gamma1, heatmap=heatmap)
                if word_scores is None:
                    block = sentence_scores
                elif sentence_scores is None:
                    block = word_scores
                else:
                    block = word_scores + sentence_scores
                result[c0:c1, i0:i1] = block.float().cpu().numpy()   # rows: captions
                if progress is not None:
                    progress((c1 - c0) * (i1 - i0))
            del visual
    finally:
        heads.train(was_training)
    if cache_full:
        log.info("score_matrix: %d of %d caption blocks cached (%d MB); the rest were re-read "
                 "for each image block", len(cache), -(-len(caption_rows) // caption_block),
                 cached_bytes >> 20)
    return result
