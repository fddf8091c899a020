"""VGG16 (torchvision): the paper's conv4_1, conv4_3, conv5_1, conv5_3."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from multigrounding.pipeline.backbones.base import (BackboneBuilder, BackboneSpec, FeatureLevel,
                                                    Normalisation, WeightsRecord)
from multigrounding.pipeline.backbones.registry import register_backbone
from multigrounding.pipeline.backbones.weights import fetch_torch_hub


class _VGG16Features(nn.Module):
    """torchvision's VGG16 ``features`` alone (same state-dict keys); the 120M-parameter
    classifier is never built."""

    def __init__(self):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"], batch_norm=False)
        for module in self.features.modules():  # torchvision's VGG initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(module.bias, 0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    forward = forward_features


@register_backbone
class VGG16(BackboneBuilder):
    spec = BackboneSpec(
        name="vgg16",
        levels=(FeatureLevel("conv4_1", "features.18", 512, 8),
                FeatureLevel("conv4_3", "features.22", 512, 8),
                FeatureLevel("conv5_1", "features.25", 512, 16),
                FeatureLevel("conv5_3", "features.29", 512, 16)),
        grid=18,
        input_size=299,
        weights={
            "imagenet_features": WeightsRecord(
                name="imagenet_features",
                source="https://download.pytorch.org/models/vgg16_features-amdegroot-88682ab5.pth",
                sha256=None,
                normalisation=Normalisation(
                    "RGB 0-255 minus the VGG mean [123.68, 116.78, 103.94] (no scaling)",
                    1.0, (123.68, 116.78, 103.94), (1.0, 1.0, 1.0)),
                notes="torchvision VGG16_Weights.IMAGENET1K_FEATURES: the original VGG weights, trained "
                      "with mean subtraction only — the paper's features. Only `features` is valid "
                      "(the classifier holds NaN and is not loaded). torchvision declares mean "
                      "(0.48235, 0.45882, 0.40784) with std 1/255, i.e. 123.0, 117.0, 104.0 on 0-255; "
                      "we subtract the paper's VGG mean, within 0.7 grey levels of it. The file name "
                      "carries its sha256 prefix (88682ab5), checked on download and load."),
            "imagenet_v1": WeightsRecord(
                name="imagenet_v1",
                source="https://download.pytorch.org/models/vgg16-397923af.pth",
                sha256=None,
                normalisation=Normalisation(
                    "RGB scaled to 0-1, ImageNet mean/std", 1.0 / 255.0,
                    (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                notes="torchvision VGG16_Weights.IMAGENET1K_V1 (trained from scratch by torchvision, "
                      "71.6% top-1). Only `features` is loaded. sha256 prefix 397923af in the file name."),
        },
        default_weights="imagenet_features",
        description="VGG16 (torchvision), the paper's taps: conv4_1, conv4_3, conv5_1, conv5_3 after "
                    "ReLU. At 299 px conv4 is 37×37 (resized to 18×18) and conv5 is 18×18.",
    )
    dropped_prefixes = ("classifier.",)

    def build(self) -> nn.Module:
        return _VGG16Features()

    def fetch(self, record: WeightsRecord) -> Path:
        return fetch_torch_hub(self.spec, record)
