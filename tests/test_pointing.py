"""The pointing game's pieces on hand-worked cases (METHOD.md, "Test-time heatmaps and metrics")."""
import pytest
import torch

from multigrounding.datasets.records import Phrase
from multigrounding.evaluation.heatmap_metrics import (attention_correctness, box_mask, center_hit,
                                                       is_hit, point, point_and_correctness,
                                                       random_hit_rate, resize_to_image, skip_reason)
from multigrounding.heads.inference import phrase_map


def one_hot(grid: int, x: int, y: int) -> torch.Tensor:
    heat = torch.zeros(grid, grid)
    heat[y, x] = 1.0
    return heat


def test_a_point_on_the_box_border_is_a_hit_and_one_pixel_outside_is_not():
    box = [[10, 20, 30, 40]]
    for xy in [(10, 20), (30, 40), (10, 40), (30, 20), (20, 20)]:
        assert is_hit(xy, box), xy
    for xy in [(9, 20), (31, 30), (20, 19), (20, 41)]:
        assert not is_hit(xy, box), xy
    assert not is_hit(None, box)   # no heatmap: a miss


def test_with_several_boxes_any_one_is_enough():
    boxes = [[0, 0, 5, 5], [50, 50, 60, 60]]
    assert is_hit((55, 52), boxes) and is_hit((2, 2), boxes) and not is_hit((20, 20), boxes)


def test_point_resizes_bilinearly_to_a_non_square_original():
    # A 2x2 map hot in its top-right cell, resized to 400 wide x 100 high: the argmax is in the
    # top-right quadrant, and the resized map has the original's size.
    heat = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    assert resize_to_image(heat, 400, 100).shape == (100, 400)
    x, y = point(heat, 400, 100)
    assert 200 <= x < 400 and 0 <= y < 50
    # align_corners=False: the cell centre of a 1-hot cell maps to that cell's centre pixel region
    x, y = point(one_hot(4, 1, 2), 80, 40)
    assert 20 <= x < 40 and 20 <= y < 30


def test_an_all_zero_heatmap_is_a_miss_with_zero_attention_correctness():
    zero = torch.zeros(3, 3)
    assert point(zero, 30, 30) is None
    assert attention_correctness(zero, [[0, 0, 29, 29]], 30, 30) == 0.0
    assert phrase_map(torch.ones(2, 3, 3), torch.zeros(2)) is None


def test_attention_correctness_is_the_mass_inside_the_boxes():
    heat = torch.ones(2, 2)   # uniform: resized stays uniform
    assert attention_correctness(heat, [[0, 0, 9, 19]], 20, 20) == pytest.approx(0.5)
    assert attention_correctness(heat, [[0, 0, 19, 19]], 20, 20) == pytest.approx(1.0)
    # overlapping boxes count each pixel once
    assert attention_correctness(heat, [[0, 0, 9, 19], [0, 0, 9, 19]], 20, 20) == pytest.approx(0.5)


def test_phrase_map_weights_word_maps_by_their_scores():
    maps = torch.stack([one_hot(2, 0, 0), one_hot(2, 1, 1)])
    combined = phrase_map(maps, torch.tensor([3.0, 1.0]))
    assert combined[0, 0] == pytest.approx(0.75) and combined[1, 1] == pytest.approx(0.25)


def test_skips_follow_the_protocol():
    w, h = 100, 100
    assert skip_reason(Phrase("x", [[0, 0, 50, 50]], type="notvisual"), w, h) == "notvisual"
    assert skip_reason(Phrase("x", []), w, h) == "no box"
    # union box 20x20 = 4% of the image: skipped; 23x23 = 5.3%: kept
    assert skip_reason(Phrase("x", [[0, 0, 20, 20]]), w, h) == "small"
    assert skip_reason(Phrase("x", [[0, 0, 23, 23]]), w, h) is None
    # the union of two small boxes far apart is large: kept
    assert skip_reason(Phrase("x", [[0, 0, 5, 5], [90, 90, 99, 99]]), w, h) is None


def test_center_and_random_baselines():
    # 101x51 image: centre pixel (50, 25)
    assert center_hit([[50, 25, 60, 30]], 101, 51)
    assert not center_hit([[51, 0, 100, 50]], 101, 51)
    # a 10x10 box (borders included: 11x11 pixels) in a 100x50 image
    assert random_hit_rate([[0, 0, 10, 10]], 100, 50) == pytest.approx(121 / 5000)
    # two overlapping boxes: the union's pixels, once
    assert random_hit_rate([[0, 0, 9, 9], [5, 0, 14, 9]], 100, 50) == pytest.approx(150 / 5000)
    # fractional box edges: only whole pixels inside count
    assert box_mask([[0.5, 0.5, 2.5, 1.0]], 4, 3).sum() == 2   # pixels x 1..2, y 1


def test_point_and_correctness_in_one_resize_equal_the_two_functions():
    heat = torch.rand(5, 5) - 0.3
    boxes = [[3, 7, 40, 22], [10, 0, 12, 29]]
    xy, correctness = point_and_correctness(heat, boxes, 61, 30)
    assert xy == point(heat, 61, 30)
    assert correctness == pytest.approx(attention_correctness(heat, boxes, 61, 30))
    assert point_and_correctness(torch.zeros(5, 5), boxes, 61, 30) == (None, 0.0)
