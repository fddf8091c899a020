"""The pointing game counted two ways on the same heatmaps, worked out by hand.

Every image is 100 x 100 and every heatmap 4 x 4 with one or two hot cells. Resized bilinearly
(cell centres, edges held), a hot cell in column c = 1, 2, 3 peaks at x = 25c + 12, and one in
column 0 makes a plateau from x = 0 to 12 whose first pixel, x = 0, is the argmax; rows alike.
"""
import numpy as np
import pytest
import torch

from multigrounding.datasets.flickr30k import read_flickr30k
from multigrounding.datasets.problems import ProblemLog
from multigrounding.datasets.records import NOTVISUAL, SCENE, Phrase
from multigrounding.errors import UnknownNameError
from multigrounding.evaluation.heatmap_metrics import point, resize_to_image
from multigrounding.evaluation.protocols import PROTOCOLS, PhraseHeatmap, count, units

from test_flickr30k import dataset  # noqa: F401  (pytest fixture: native Flickr30k files)

SIZE = 100
TWO_MEN = [[0, 0, 30, 99], [70, 0, 99, 99]]   # two boxes with a gap between them
DOG = [[50, 50, 99, 99]]
BALL = [[0, 60, 9, 69], [60, 0, 99, 79]]      # first box 1 % of the image, union 63 %
HAT = [[0, 0, 50, 10]]                         # exactly 5 %: 50 x 10 = 500 of 10,000 pixels
LEFT = [[0, 0, 49, 99]]


def hot(row: int, col: int, value: float = 1.0, also: tuple | None = None) -> np.ndarray:
    heat = np.zeros((4, 4), np.float16)
    heat[row, col] = value
    if also is not None:
        heat[also[0], also[1]] = also[2]
    return heat


def mention(record, text, boxes, heat, *, chain=None, caption=0, type=None, category="people"):
    return PhraseHeatmap(record, Phrase(text, [list(map(float, b)) for b in boxes], caption=caption,
                                        start=0 if caption is not None else None,
                                        category=category, type=type, chain=chain),
                         SIZE, SIZE, heat)


def scene(chains: bool = True) -> list[PhraseHeatmap]:
    c = (lambda name: name) if chains else (lambda name: None)
    return [
        # record 0, Flickr30k style: mentions in two captions
        mention(0, "two men", TWO_MEN, hot(0, 1), chain=c("1")),              # (37, 0): the gap
        mention(0, "the men", TWO_MEN, hot(0, 1, 2.0), chain=c("1"), caption=1),
        mention(0, "a dog", DOG, hot(3, 3), chain=c("2"), category="animals"),        # (87, 87)
        mention(0, "the dog", DOG, hot(0, 0, 0.6), chain=c("2"), caption=1, category="animals"),
        mention(0, "a ball", BALL, hot(1, 3), chain=c("3"), category="other"),        # (87, 37)
        mention(0, "a hat", HAT, hot(0, 0), chain=c("4"), caption=1, category="clothing"),
        mention(0, "the sky", [], None, chain=c("5"), type=SCENE, category="scene"),
        mention(0, "the sky", [], None, chain=c("5"), caption=1, type=SCENE, category="scene"),
        mention(0, "someone", [], None, caption=1, type=NOTVISUAL, category="notvisual"),
        # record 1, ReferIt style: two standalone queries of one box
        mention(1, "left guy", LEFT, hot(1, 0), caption=None),                  # (0, 37)
        mention(1, "guy on the left", LEFT, hot(1, 3), caption=None),           # (87, 37)
    ]


def test_the_hot_cells_point_where_the_module_docstring_says():
    def at(heat):
        return point(torch.from_numpy(heat.astype(np.float32)), SIZE, SIZE)

    assert at(hot(0, 1)) == (37, 0) and at(hot(0, 0)) == (0, 0) and at(hot(1, 0)) == (0, 37)
    assert at(hot(3, 3)) == (87, 87) and at(hot(1, 3)) == (87, 37)


def test_paper_scores_every_phrase_inside_any_box():
    # two men: both at (37, 0), between the boxes: 2 misses; a dog: hit, the dog at (0, 0):
    # miss; a ball at (87, 37) in its second box: hit (union 63 %, scored); a hat at (0, 0), its
    # corner: hit (5 % is not below 5 %); the queries: hit, miss. The sky twice and someone:
    # skipped.
    result = count(scene(), "paper")
    assert (result.unit, result.hits, result.misses, result.phrases) == ("phrase", 4, 4, 8)
    assert result.accuracy == 0.5
    assert dict(result.skipped) == {SCENE: 2, NOTVISUAL: 1}
    # the centre (50, 50) lies in the dog's box (twice); the random pixel's expected hits are
    # the boxes' shares of the image: .61 + .61 + .25 + .25 + .33 + .0561 + .5 + .5
    assert result.center_hits == 2
    assert result.random_hits == pytest.approx(3.1061)
    summary = result.summary()
    assert summary["per_category"]["animals"] == {"scored": 2, "hits": 1, "accuracy": 0.5}
    assert summary["center_baseline"] == 0.25 and summary["random_baseline"] == pytest.approx(0.3882625)


def test_wwbl_scores_every_entity_inside_its_union_box_with_the_mean_heatmap():
    # two men: the mean points at (37, 0), inside the union [0, 0, 99, 99]: one hit where the
    # paper counts two misses. The dog: the mean map is .5 at (87, 87) and .3 at (0, 0): one hit
    # where the paper counts a hit and a miss. The ball: first box 1 %: skipped. The hat: first
    # box exactly 5 %, not more: skipped. The sky: one entity, skipped once. The queries stay two.
    result = count(scene(), "wwbl")
    assert (result.unit, result.hits, result.misses, result.phrases) == ("entity", 3, 1, 6)
    assert result.accuracy == 0.75
    assert dict(result.skipped) == {"small": 2, SCENE: 1, NOTVISUAL: 1}
    assert result.center_hits == 2  # the men's union and the dog's box hold (50, 50)
    assert result.random_hits == pytest.approx(1.0 + 0.25 + 0.5 + 0.5)
    assert result.summary()["per_category"] == {
        "animals": {"scored": 1, "hits": 1, "accuracy": 1.0},
        "people": {"scored": 3, "hits": 2, "accuracy": 2 / 3}}


def test_a_louder_wrong_mention_turns_the_entity_into_a_miss():
    """The mean of heatmaps, not a vote: "the dog" three times as hot at (0, 0) moves the point."""
    phrases = scene()
    phrases[3] = mention(0, "the dog", DOG, hot(0, 0, 3.0), chain="2", caption=1, category="animals")
    assert count(phrases, "paper").hits == 4                 # per phrase nothing changes
    wwbl = count(phrases, "wwbl")
    assert (wwbl.hits, wwbl.misses) == (2, 2)


def test_entities_and_their_boxes():
    found = {u.key: u for u in units(scene(), "wwbl")}
    men = found[0, "chain", "1"]
    assert men.members == [0, 1] and men.boxes == [[0, 0, 99, 99]] and men.skipped is None
    assert found[0, "chain", "3"].boxes == [[0, 0, 99, 79]] and found[0, "chain", "3"].skipped == "small"
    assert found[0, "chain", "5"].members == [6, 7]
    assert len(found) == 8  # 5 chains, someone, 2 queries
    assert [u.members for u in units(scene(), "paper")] == [[k] for k in range(11)]


def test_without_chains_identical_boxes_in_captions_are_one_entity():
    """Old manifests (no chain): the men's and the dog's mentions still pair up by their boxes;
    boxless mentions and standalone queries stay apart."""
    result = count(scene(chains=False), "wwbl")
    assert (result.hits, result.misses, result.phrases) == (3, 1, 6)
    assert dict(result.skipped) == {"small": 2, SCENE: 2, NOTVISUAL: 1}


def test_two_chains_with_the_same_boxes_need_the_chain_ids():
    phrases = [mention(0, "a man", LEFT, hot(1, 0), chain="7"),
               mention(0, "a guitarist", LEFT, hot(1, 3, 2.0), chain="8", caption=1)]
    assert (count(phrases, "wwbl").hits, count(phrases, "wwbl").misses) == (1, 1)
    merged = [mention(0, p.phrase.text, LEFT, p.heatmap, caption=p.phrase.caption) for p in phrases]
    assert (count(merged, "wwbl").hits, count(merged, "wwbl").misses) == (0, 1)


def test_missing_heatmaps_are_zero_maps_in_the_mean_and_a_miss_alone():
    one = [mention(0, "a dog", DOG, None, chain="2"),
           mention(0, "the dog", DOG, hot(3, 3), chain="2", caption=1)]
    assert count(one, "wwbl").hits == 1 and count(one, "paper").hits == 1
    none = [mention(0, "a dog", DOG, None, chain="2"), mention(0, "the dog", DOG, None, chain="2")]
    assert (count(none, "wwbl").misses, count(none, "paper").misses) == (1, 2)


def test_the_mean_of_small_maps_points_where_the_mean_of_resized_maps_does():
    rng = np.random.default_rng(0)
    for _ in range(20):
        maps = torch.from_numpy(rng.random((3, 7, 7), dtype=np.float32))
        width, height = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        full = torch.stack([resize_to_image(m, width, height) for m in maps]).mean(0)
        index = int(torch.argmax(full))
        assert point(maps.mean(0), width, height) == (index % width, index // width)


def test_an_unknown_protocol_names_the_choices():
    with pytest.raises(UnknownNameError) as info:
        count(scene(), "wwb")
    assert "wwbl" in str(info.value) and PROTOCOLS == ("paper", "wwbl")


def test_units_of_the_flickr30k_reader_output(dataset):
    """The native fixture through the reader: chain 18 ("A child", "A little girl") is one entity
    over two captions; chain 23 ("two dogs") shares a box with 22 but is another entity, and its
    first box (7,326 of 187,500 pixels) is under 5 % though its union is not: the paper scores
    it, WWbL skips it."""
    root, images = dataset
    phrases = [PhraseHeatmap(row, phrase, record.width, record.height, None)
               for row, record in enumerate(read_flickr30k(root, images, problems=ProblemLog()))
               for phrase in record.phrases]
    paper, wwbl = count(phrases, "paper"), count(phrases, "wwbl")
    assert (paper.scored, dict(paper.skipped)) == (
        6, {"nobox": 1, "scene": 1, "small": 3, "notvisual": 1})
    assert (wwbl.scored, wwbl.phrases, dict(wwbl.skipped)) == (
        3, 5, {"nobox": 1, "scene": 1, "small": 4, "notvisual": 1})
    entities = {u.key[2]: u for u in units(phrases, "wwbl") if u.key[1] == "chain" and u.key[0] == 0}
    assert [phrases[k].phrase.text for k in entities["18"].members] == ["A child", "A little girl"]
    assert entities["23"].skipped == "small" and entities["22"].members != entities["23"].members
    assert paper.hits == wwbl.hits == 0  # no heatmaps: every scored unit is a miss


def test_a_lone_phrase_is_scored_by_its_given_point_and_a_callers_skip_wins():
    """``evaluate`` keeps heatmaps only for entities with several mentions: a lone phrase comes
    with the pixel its own map points at. A reason only the caller knows (the image failed)
    skips the phrase under both protocols."""
    lone = [mention(1, "left guy", LEFT, None, caption=None)]
    assert count(lone, "paper").misses == 1                       # no map, no point: a miss
    pointed = [PhraseHeatmap(1, lone[0].phrase, SIZE, SIZE, None, xy=(10, 10))]
    assert count(pointed, "paper").hits == count(pointed, "wwbl").hits == 1
    outside = [PhraseHeatmap(1, lone[0].phrase, SIZE, SIZE, hot(1, 0), xy=(87, 37))]
    assert count(outside, "paper").misses == 1                    # the given point is used
    failed = [PhraseHeatmap(0, p.phrase, SIZE, SIZE, p.heatmap, skip="image failed")
              for p in scene()]
    assert dict(count(failed, "paper").skipped) == {"image failed": 11}
    assert dict(count(failed, "wwbl").skipped) == {"image failed": 8}
