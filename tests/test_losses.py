"""The retrieval losses against independent numpy transcriptions, loop by loop."""
import math

import numpy as np
import pytest
import torch

from multigrounding.heads.losses import matching_loss, npair_loss, phrase_matching_loss, triplet_hard_loss
from multigrounding.heads.scores import HeadsInputError


def npair_numpy(S, scale):
    B = len(S)
    captions = [math.log(1 + sum(math.exp(scale * (S[b][c] - S[b][b])) for c in range(B) if c != b))
                for b in range(B)]
    images = [math.log(1 + sum(math.exp(scale * (S[b][c] - S[c][c])) for b in range(B) if b != c))
              for c in range(B)]
    return sum(captions) / B + sum(images) / B


def triplet_numpy(S, margin):
    B = len(S)
    total_captions = total_images = 0.0
    for b in range(B):
        hardest = max(S[b][c] for c in range(B) if c != b)
        total_captions += max(0.0, margin - S[b][b] + hardest)
    for c in range(B):
        hardest = max(S[b][c] for b in range(B) if b != c)
        total_images += max(0.0, margin - S[c][c] + hardest)
    return total_captions / B + total_images / B


@pytest.mark.parametrize("seed, B, scale", [(0, 2, 1.0), (1, 5, 10.0), (2, 16, 3.5)])
def test_npair_matches_the_numpy_transcription(seed, B, scale):
    S = np.random.default_rng(seed).uniform(-1, 2, size=(B, B))
    got = npair_loss(torch.tensor(S), scale)
    assert float(got) == pytest.approx(npair_numpy(S.tolist(), scale), rel=1e-10)
    # the same as the two-way softmax on one score
    assert float(got) == pytest.approx(float(matching_loss(torch.tensor(S), scale)), rel=1e-10)


@pytest.mark.parametrize("seed, B, margin", [(0, 2, 0.2), (1, 6, 0.2), (3, 12, 0.5)])
def test_triplet_hard_matches_the_numpy_transcription(seed, B, margin):
    S = np.random.default_rng(seed).uniform(-1, 1, size=(B, B))
    got = triplet_hard_loss(torch.tensor(S), margin)
    assert float(got) == pytest.approx(triplet_numpy(S.tolist(), margin), rel=1e-10)


def test_triplet_gradient_reaches_only_the_positive_and_the_hardest_negatives():
    S = torch.tensor([[0.5, 0.45, 0.1], [0.0, 0.6, 0.2], [0.35, 0.1, 0.9]], requires_grad=True)
    triplet_hard_loss(S, 0.2).backward()
    # caption 0: hardest image 1 (0.45) violates; image 0: hardest caption 2 (0.35) violates;
    # caption 1: hardest 0.2 -> 0.2 - 0.6 + 0.2 = -0.2, no loss; image 1: hardest 0.45 -> 0.05 > 0;
    # caption 2 / image 2: no violation
    expected = torch.tensor([[-2, 1, 0], [0, -1, 0], [1, 0, 0]], dtype=torch.float32) / 3
    expected[0, 1] += 1 / 3   # S[0,1] is both caption 0's and image 1's hardest negative
    assert torch.allclose(S.grad, expected)


def test_a_perfect_margin_gives_zero_triplet_loss_and_small_npair_loss():
    S = torch.eye(4) * 2 - 1
    assert float(triplet_hard_loss(S, 0.2)) == 0.0
    assert float(npair_loss(S, 10.0)) < 1e-6


@pytest.mark.parametrize("loss", [npair_loss, triplet_hard_loss])
def test_losses_need_a_square_batch_with_a_negative(loss):
    for bad in (torch.zeros(2, 3), torch.zeros(1, 1), torch.zeros(3)):
        with pytest.raises(HeadsInputError):
            loss(bad)


def test_triplet_sum_over_negatives_matches_the_numpy_transcription():
    S = np.random.default_rng(5).uniform(-1, 1, size=(7, 7))
    B, m = 7, 0.3
    expected = sum(max(0.0, m - S[b, b] + S[b, c]) for b in range(B) for c in range(B) if c != b) / B \
        + sum(max(0.0, m - S[c, c] + S[b, c]) for c in range(B) for b in range(B) if b != c) / B
    assert float(triplet_hard_loss(torch.tensor(S), m, hardest=False)) == pytest.approx(expected, rel=1e-10)


def phrase_numpy(P, caption, negative, g):
    Q, B = P.shape
    image_to_phrase = phrase_to_image = 0.0
    for q in range(Q):
        c = caption[q]
        own = math.exp(g * P[q][c])
        others = sum(math.exp(g * P[n][c]) for n in range(Q) if negative[n][c])
        image_to_phrase += -math.log(own / (own + others))
        others = sum(math.exp(g * P[q][d]) for d in range(B) if negative[q][d])
        phrase_to_image += -math.log(own / (own + others))
    return image_to_phrase / Q + phrase_to_image / Q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phrase_loss_matches_the_numpy_transcription(seed):
    rng = np.random.default_rng(seed)
    Q, B = 9, 4
    P = rng.uniform(-1, 1, size=(Q, B))
    caption = rng.integers(0, B, size=Q)
    negative = rng.random((Q, B)) < 0.6
    negative[np.arange(Q), caption] = False        # a label is never a negative of its own image
    got = phrase_matching_loss(torch.tensor(P), torch.tensor(caption), torch.tensor(negative), 10.0)
    assert float(got) == pytest.approx(phrase_numpy(P, caption, negative, 10.0), rel=1e-9)


def test_phrase_loss_without_negatives_is_zero_and_has_a_gradient():
    P = torch.rand(3, 2, requires_grad=True)
    loss = phrase_matching_loss(P, torch.tensor([0, 1, 1]), torch.zeros(3, 2, dtype=torch.bool))
    assert float(loss.detach()) == pytest.approx(0.0)
    loss.backward()
    assert P.grad is not None
