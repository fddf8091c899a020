"""Retrieval metrics on hand-ranked score matrices, the 1K fold protocol, and the blockwise
score matrix against one all-at-once call of ``cross_scores``."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from multigrounding.errors import MultigroundingError, UnknownNameError
from multigrounding.evaluation import retrieval
from multigrounding.evaluation.retrieval import (RetrievalError, fold_metrics, retrieval_metrics,
                                                 score_matrix)
from multigrounding.heads.model import GroundingHeads, HeadsConfig
from multigrounding.heads.scores import cross_scores

# Captions 0, 1 → image 0; caption 2 → image 1; caption 3 → image 2.
SCORES = np.array([[0.9, 0.1, 0.3],
                   [0.2, 0.8, 0.5],
                   [0.4, 0.7, 0.6],
                   [0.5, 0.6, 0.3]])
CAPTION_IMAGE = np.array([0, 0, 1, 2])


# ------------------------------------------------------------------------- retrieval_metrics
def test_hand_ranked_matrix():
    result = retrieval_metrics(SCORES, CAPTION_IMAGE)
    # text→image, own score vs its row:
    #   c0: 0.9 in [0.9, 0.1, 0.3] → nothing higher → rank 1
    #   c1: 0.2 in [0.2, 0.8, 0.5] → 0.8, 0.5 higher → rank 3
    #   c2: 0.7 in [0.4, 0.7, 0.6] → nothing higher → rank 1
    #   c3: 0.3 in [0.5, 0.6, 0.3] → 0.5, 0.6 higher → rank 3
    # ranks [1, 3, 1, 3]: R@1 = 2/4, R@5 = R@10 = 4/4, median 2, mean 2
    assert result["text_to_image"] == {"r1": 50.0, "r5": 100.0, "r10": 100.0,
                                       "median_rank": 2.0, "mean_rank": 2.0}
    # image→text, best own caption vs its column:
    #   i0: column [0.9, 0.2, 0.4, 0.5], own c0 0.9 / c1 0.2 → best 0.9, nothing higher → 1
    #   i1: column [0.1, 0.8, 0.7, 0.6], own c2 0.7 → 0.8 (c1) higher → rank 2
    #   i2: column [0.3, 0.5, 0.6, 0.3], own c3 0.3 → 0.5, 0.6 higher; c0's 0.3 is a tie and
    #       counts against the image → rank 4
    # ranks [1, 2, 4]: R@1 = 1/3, R@5 = R@10 = 3/3, median 2, mean 7/3
    i2t = result["image_to_text"]
    assert i2t["r1"] == pytest.approx(100 / 3)
    assert (i2t["r5"], i2t["r10"], i2t["median_rank"]) == (100.0, 100.0, 2.0)
    assert i2t["mean_rank"] == pytest.approx(7 / 3)
    assert result["rsum"] == pytest.approx(50 + 100 + 100 + 100 / 3 + 100 + 100)
    assert (result["captions"], result["images"]) == (4, 3)
    assert all(type(v) is float for d in ("text_to_image", "image_to_text")
               for v in result[d].values())


def test_custom_ks_name_the_keys():
    # same ranks as above: t2i [1, 3, 1, 3], i2t [1, 2, 4]
    result = retrieval_metrics(SCORES, CAPTION_IMAGE, ks=(1, 2))
    assert result["text_to_image"]["r2"] == 50.0
    assert result["image_to_text"]["r2"] == pytest.approx(200 / 3)
    assert set(result["text_to_image"]) == {"r1", "r2", "median_rank", "mean_rank"}
    assert result["rsum"] == pytest.approx(50 + 50 + 100 / 3 + 200 / 3)


def test_ties_count_against_the_query():
    # every pair scores the same: every wrong candidate ties, so every answer ranks last
    result = retrieval_metrics(np.zeros((4, 3)), CAPTION_IMAGE)
    assert result["text_to_image"]["r1"] == 0.0
    assert result["text_to_image"]["mean_rank"] == 3.0        # 3 images
    # image→text: i0 has 2 own captions (2 wrong ones tie) → rank 3; i1, i2 → 3 wrong → rank 4
    assert result["image_to_text"]["r1"] == 0.0
    assert result["image_to_text"]["mean_rank"] == pytest.approx((3 + 4 + 4) / 3)


def test_image_without_captions_is_only_a_distractor():
    scores = np.array([[0.5, 0.1, 0.9],      # c0 → i0; i2 (no caption) beats it → rank 2
                       [0.2, 0.6, 0.1],      # c1 → i1 → rank 1
                       [0.3, 0.4, 0.2]])     # c2 → i1: 0.4 highest → rank 1
    result = retrieval_metrics(scores, np.array([0, 1, 1]))
    # text→image ranks [2, 1, 1]: R@1 = 2/3, median 1, mean 4/3
    t2i = result["text_to_image"]
    assert t2i["r1"] == pytest.approx(200 / 3)
    assert (t2i["median_rank"], t2i["mean_rank"]) == (1.0, pytest.approx(4 / 3))
    # image→text over i0 and i1 only:
    #   i0: column [0.5, 0.2, 0.3], own c0 → rank 1
    #   i1: column [0.1, 0.6, 0.4], own c1 0.6 / c2 0.4 → best 0.6 → rank 1
    i2t = result["image_to_text"]
    assert (i2t["r1"], i2t["median_rank"], i2t["mean_rank"]) == (100.0, 1.0, 1.0)
    assert result["images"] == 3


@pytest.mark.parametrize("scores, caption_image, ks, message", [
    (np.zeros(3), [0, 0, 0], (1,), "2-D"),
    (np.zeros((2, 3, 1)), [0, 0], (1,), "2-D"),
    (np.zeros((0, 3)), np.zeros(0, dtype=int), (1,), "no captions"),
    (np.zeros((3, 2)), [0, 1], (1,), "one image column per caption"),
    (np.zeros((2, 2)), [0, 2], (1,), r"\[0, 2\)"),
    (np.zeros((2, 2)), [-1, 0], (1,), r"\[0, 2\)"),
    (np.zeros((2, 2)), [0.0, 1.0], (1,), "integer"),
    (np.array([[0.1, np.nan], [0.2, 0.3]]), [0, 1], (1,), "NaN"),
    (np.zeros((2, 2)), [0, 1], (0,), "ks"),
])
def test_bad_inputs_raise(scores, caption_image, ks, message):
    with pytest.raises(RetrievalError, match=message) as caught:
        retrieval_metrics(scores, np.asarray(caption_image), ks=ks)
    assert isinstance(caught.value, MultigroundingError)
    assert isinstance(caught.value, ValueError)


# ------------------------------------------------------------------------------ fold_metrics
def _random_problem(images: int, per_image: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    caption_image = rng.permutation(np.repeat(np.arange(images), per_image))
    scores = rng.normal(size=(len(caption_image), images))
    scores[np.arange(len(caption_image)), caption_image] += 1.0     # some signal, not perfect
    return scores, caption_image


def _assert_same(actual: dict, expected: dict):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        if isinstance(value, dict):
            _assert_same(actual[key], value)
        else:
            assert actual[key] == pytest.approx(value), key


def test_one_fold_is_retrieval_metrics():
    scores, caption_image = _random_problem(10)
    result = fold_metrics(scores, caption_image, fold_size=10)
    assert (result.pop("folds"), result.pop("dropped_images")) == (1, 0)
    _assert_same(result, retrieval_metrics(scores, caption_image))
    smaller = fold_metrics(scores, caption_image, fold_size=1000)    # one partial fold: kept
    assert (smaller.pop("folds"), smaller.pop("dropped_images")) == (1, 0)
    _assert_same(smaller, retrieval_metrics(scores, caption_image))


def test_two_folds_average_their_submatrices():
    scores, caption_image = _random_problem(11, seed=1)     # image 10 is a dropped partial fold
    first = caption_image < 5
    second = (caption_image >= 5) & (caption_image < 10)
    a = retrieval_metrics(scores[first][:, :5], caption_image[first])
    b = retrieval_metrics(scores[second][:, 5:10], caption_image[second] - 5)
    assert a != b
    expected = {d: {k: (a[d][k] + b[d][k]) / 2 for k in a[d]}
                for d in ("text_to_image", "image_to_text")}
    expected.update(rsum=(a["rsum"] + b["rsum"]) / 2, captions=10, images=5, folds=2,
                    dropped_images=1)
    _assert_same(fold_metrics(scores, caption_image, fold_size=5), expected)


def test_fold_errors():
    scores, caption_image = _random_problem(4)
    with pytest.raises(RetrievalError, match="fold_size"):
        fold_metrics(scores, caption_image, fold_size=0)
    with pytest.raises(RetrievalError, match="fold 1"):
        fold_metrics(scores[:, :4], np.zeros(len(caption_image), dtype=int), fold_size=2)


# ------------------------------------------------------------------------------ score_matrix
CONFIG = dict(visual_channels=[8, 12], text_layers=3, text_dim=10, sentence_vectors=2, dim=16)
IMAGES, GRID = 7, 4
LENGTHS = [3, 1, 5, 2, 4]


class FakeVisualReader:
    def __init__(self, rng):
        self.levels = [rng.normal(size=(IMAGES, GRID, GRID, c)).astype(np.float16)
                       for c in CONFIG["visual_channels"]]
        self.reads = 0

    def read(self, rows):
        self.reads += 1
        return [level[np.asarray(rows)] for level in self.levels]


class FakeTextReader:
    def __init__(self, rng):
        self.tokens = [rng.normal(size=(n, CONFIG["text_layers"], CONFIG["text_dim"]))
                       .astype(np.float16) for n in LENGTHS]
        self.sentence = rng.normal(size=(len(LENGTHS), CONFIG["sentence_vectors"],
                                         CONFIG["text_dim"])).astype(np.float16)
        self.reads = 0

    def read(self, rows):
        self.reads += 1
        rows = list(rows)
        width = max(LENGTHS[r] for r in rows)
        tokens = np.zeros((len(rows), width) + self.tokens[0].shape[1:], dtype=np.float16)
        mask = np.zeros((len(rows), width), dtype=bool)
        for b, r in enumerate(rows):
            tokens[b, :LENGTHS[r]], mask[b, :LENGTHS[r]] = self.tokens[r], True
        return tokens, mask, self.sentence[rows]


IMAGE_ROWS = [6, 0, 3, 2, 5, 1, 4]
CAPTION_ROWS = [4, 2, 0, 1, 3]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    heads = GroundingHeads(HeadsConfig(**CONFIG))
    rng = np.random.default_rng(0)
    visual_reader, text_reader = FakeVisualReader(rng), FakeTextReader(rng)
    with torch.no_grad():
        visual = heads.map_visual([torch.from_numpy(x).float()
                                   for x in visual_reader.read(IMAGE_ROWS)])
        tokens, mask, sentence = text_reader.read(CAPTION_ROWS)
        words = heads.map_words(torch.from_numpy(tokens).float())
        sentence = heads.map_sentence(torch.from_numpy(sentence).float())
        r_w, r_s = cross_scores(words, torch.from_numpy(mask), sentence, visual)
    expected = {"word": r_w.numpy(), "sentence": r_s.numpy(), "both": (r_w + r_s).numpy()}
    return heads, visual_reader, text_reader, expected


@pytest.mark.parametrize("terms", ["both", "word", "sentence"])
def test_blocked_scores_equal_one_call(setup, terms):
    heads, visual_reader, text_reader, expected = setup
    done = []
    result = score_matrix(heads, visual_reader, text_reader, IMAGE_ROWS, CAPTION_ROWS,
                          terms=terms, image_block=3, caption_block=2, progress=done.append)
    assert result.dtype == np.float32
    assert result.shape == (len(CAPTION_ROWS), len(IMAGE_ROWS))      # rows are captions
    np.testing.assert_allclose(result, expected[terms], atol=1e-5)
    assert sum(done) == len(CAPTION_ROWS) * len(IMAGE_ROWS)
    assert len(done) == 3 * 3                                        # 7 = 3+3+1, 5 = 2+2+1
    assert heads.training                                            # mode restored


def test_caption_blocks_cached_or_reread(setup, monkeypatch):
    heads, visual_reader, text_reader, expected = setup
    for budget, text_reads in ((1 << 30, 3), (0, 9)):               # 3 caption × 3 image blocks
        monkeypatch.setattr(retrieval, "CAPTION_CACHE_BYTES", budget)
        visual_reader.reads = text_reader.reads = 0
        result = score_matrix(heads, visual_reader, text_reader, IMAGE_ROWS, CAPTION_ROWS,
                              image_block=3, caption_block=2)
        np.testing.assert_allclose(result, expected["both"], atol=1e-5)
        assert (visual_reader.reads, text_reader.reads) == (3, text_reads)


def test_score_matrix_rejects_unknown_terms(setup):
    heads, visual_reader, text_reader, _ = setup
    with pytest.raises(UnknownNameError, match="Did you mean 'word'"):
        score_matrix(heads, visual_reader, text_reader, IMAGE_ROWS, CAPTION_ROWS, terms="words")
