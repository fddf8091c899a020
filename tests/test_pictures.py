import numpy as np
import pytest
import torch
from PIL import Image

from multigrounding.errors import MultigroundingError, UnknownNameError
from multigrounding.evaluation.pictures import PictureError, overlay, save_png
from multigrounding.evaluation.heatmap_metrics import point as pointing_point

GREEN = (0, 255, 0)
RED = (255, 0, 0)


def photo(width=64, height=48, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return image.convert(mode) if mode != "RGB" else image


def pixels(image):
    return np.asarray(image.convert("RGB"))


@pytest.mark.parametrize("size", [(640, 480), (90, 200), (1, 1)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_the_picture_has_the_image_size_and_is_rgb(size, mode):
    image = photo(*size, mode=mode)
    heat = torch.rand(7, 7)
    out = overlay(image, heat, [[0, 0, size[0] - 1, size[1] - 1]], (size[0] - 1, 0), label="a dog")
    assert out.size == size and out.mode == "RGB"


def test_a_heatmap_hot_in_one_corner_changes_only_that_corner():
    image = photo(64, 48)
    heat = torch.zeros(4, 4)
    heat[0, 0] = 1.0
    out, before = pixels(overlay(image, heat)), pixels(image)
    assert (out[:6, :8] != before[:6, :8]).any()
    assert np.array_equal(out[-24:, -32:], before[-24:, -32:])  # opposite half-cells: m == 0


def test_a_numpy_heatmap_and_a_non_square_one_are_accepted():
    image = photo(90, 200)
    heat = np.zeros((3, 5), dtype=np.float64)
    heat[2, 4] = 3.0
    out, before = pixels(overlay(image, heat)), pixels(image)
    assert (out[-10:, -10:] != before[-10:, -10:]).any()
    assert np.array_equal(out[:60, :30], before[:60, :30])


def test_alpha_zero_leaves_the_photo_and_alpha_one_shows_the_colour_at_the_peak():
    image = photo(40, 40)
    heat = torch.ones(2, 2)
    assert np.array_equal(pixels(overlay(image, heat, alpha=0.0)), pixels(image))
    # jet at 1.0 is dark red (128, 0, 0) and a constant map is 1 everywhere
    assert np.array_equal(pixels(overlay(image, heat, alpha=1.0))[5, 5], [128, 0, 0])


@pytest.mark.parametrize("heat", [None, torch.zeros(4, 4), np.zeros((2, 3))])
def test_no_heatmap_or_an_all_zero_one_leaves_the_image_unchanged(heat):
    image = photo(50, 30)
    out = overlay(image, heat)
    assert out is not image
    assert np.array_equal(pixels(out), pixels(image))


def test_the_input_image_is_not_modified():
    image = photo(50, 30)
    before = pixels(image).copy()
    overlay(image, torch.rand(4, 4), [[2, 2, 20, 20]], (5, 5), label="x")
    assert np.array_equal(pixels(image), before)


def test_box_border_pixels_are_green_and_the_outline_grows_inward():
    image = Image.new("RGB", (300, 300), (10, 20, 30))
    out = pixels(overlay(image, None, [[50, 60, 150, 200]]))
    line = 2  # max(2, round(300 / 150))
    for x, y in [(50, 60), (150, 200), (100, 60), (50, 130), (150, 130), (100, 200),
                 (50 + line - 1, 130), (100, 200 - line + 1)]:
        assert tuple(out[y, x]) == GREEN, (x, y)
    for x, y in [(49, 130), (151, 130), (100, 59), (100, 201), (50 + line, 130), (100, 130)]:
        assert tuple(out[y, x]) == (10, 20, 30), (x, y)


def test_a_box_on_the_image_edge_stays_visible():
    width, height = 90, 200
    image = Image.new("RGB", (width, height), (0, 0, 0))
    out = pixels(overlay(image, None, [[0, 0, width - 1, height - 1]]))
    for x, y in [(0, 0), (width - 1, height - 1), (45, 0), (45, height - 1), (0, 100),
                 (width - 1, 100)]:
        assert tuple(out[y, x]) == GREEN, (x, y)
    assert tuple(out[100, 45]) == (0, 0, 0)


def test_float_boxes_outline_the_pixels_pointing_scores_and_outside_parts_are_clipped():
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    out = pixels(overlay(image, None, [[10.4, 10.6, 30.7, 40.2], [-20, -5, 500, 50]]))
    assert tuple(out[11, 11]) == GREEN and tuple(out[40, 30]) == GREEN
    assert tuple(out[20, 10]) == (0, 0, 0) and tuple(out[41, 20]) == (0, 0, 0)
    assert tuple(out[0, 99]) == GREEN and tuple(out[50, 99]) == GREEN


def test_the_pointed_pixel_is_red_and_matches_the_pointing_game():
    image = photo(640, 480)
    heat = torch.zeros(7, 7)
    heat[5, 1] = 1.0
    xy = pointing_point(heat, 640, 480)
    out = overlay(image, heat, [[0, 0, 639, 479]], xy, label="x" * 500)
    assert out.getpixel(xy) == RED
    for xy in [(0, 0), (639, 479), (0, 479)]:
        assert overlay(image, None, point=xy).getpixel(xy) == RED


def test_the_point_marker_is_a_visible_red_disc_with_a_white_rim():
    image = Image.new("RGB", (600, 600), (0, 0, 255))
    out = pixels(overlay(image, None, point=(300, 300)))  # radius 10
    assert tuple(out[300, 306]) == RED and tuple(out[294, 300]) == RED
    rim = out[300, 290:312]
    assert (rim == [255, 255, 255]).all(axis=1).any()
    assert tuple(out[300, 320]) == (0, 0, 255)


def test_a_label_darkens_a_band_at_the_top_and_long_text_is_cut():
    image = Image.new("RGB", (200, 100), (200, 200, 200))
    out = pixels(overlay(image, None, label="a man in a red hat " * 20))
    top, bottom = out[:3, :], out[-20:, :]
    assert (top < 200).all() and (bottom == 200).all()
    band = out[: out.shape[0] // 4]
    assert (band.max(axis=2) > 230).any()  # white text drawn in the band
    assert (out[:, -2:] < 200).all(axis=2)[:3].all()  # cut text leaves the band's right end dark


def test_a_point_outside_the_image_is_refused():
    image = photo(64, 48)
    for xy in [(64, 0), (0, 48), (-1, 5)]:
        with pytest.raises(PictureError, match="outside"):
            overlay(image, None, point=xy)
    with pytest.raises(PictureError):
        overlay(image, None, point=(1.5, 2))


def test_bad_heatmaps_are_refused():
    image = photo()
    with pytest.raises(PictureError, match="2-D"):
        overlay(image, torch.rand(2, 4, 4))
    with pytest.raises(PictureError, match="2-D"):
        overlay(image, np.ones(4))
    with pytest.raises(PictureError, match="NaN"):
        overlay(image, torch.tensor([[float("nan"), 1.0], [0.0, 0.0]]))


def test_bad_alpha_and_boxes_are_refused():
    image = photo()
    for alpha in (-0.1, 1.5, float("nan")):
        with pytest.raises(PictureError, match="alpha"):
            overlay(image, None, alpha=alpha)
    with pytest.raises(PictureError, match="box"):
        overlay(image, None, [[10, 10, 5, 20]])
    with pytest.raises(PictureError, match="box"):
        overlay(image, None, [[1, 2, 3]])


def test_an_unknown_colormap_names_the_closest():
    with pytest.raises(UnknownNameError, match="Did you mean 'viridis'") as caught:
        overlay(photo(), torch.rand(3, 3), colormap="viridsi")
    assert isinstance(caught.value, MultigroundingError)
    assert issubclass(PictureError, ValueError) and issubclass(PictureError, MultigroundingError)


def test_save_png_round_trips_and_leaves_no_temp_file(tmp_path):
    picture = overlay(photo(90, 200), torch.rand(4, 4), [[5, 5, 50, 60]], (10, 10), label="dog")
    path = save_png(picture, tmp_path / "deep" / "er" / "p.png")
    assert path == tmp_path / "deep" / "er" / "p.png"
    with Image.open(path) as reopened:
        assert reopened.format == "PNG"
        assert np.array_equal(pixels(reopened), pixels(picture))
    assert [p.name for p in path.parent.iterdir()] == ["p.png"]
