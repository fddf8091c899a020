"""PNASNet-5-Large (timm): cells 5, 7, 9, 11."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from multigrounding.pipeline.backbones.base import (BackboneBuilder, BackboneSpec, FeatureLevel,
                                                    Normalisation, WeightsRecord)
from multigrounding.pipeline.backbones.registry import register_backbone
from multigrounding.pipeline.backbones.weights import fetch_hf_hub


@register_backbone
class PNASNet5Large(BackboneBuilder):
    spec = BackboneSpec(
        name="pnasnet5large",
        levels=(FeatureLevel("cell_5", "cell_5", 2160, 16),
                FeatureLevel("cell_7", "cell_7", 2160, 16),
                FeatureLevel("cell_9", "cell_9", 4320, 32),
                FeatureLevel("cell_11", "cell_11", 4320, 32)),
        grid=19,
        input_size=299,
        weights={
            "imagenet": WeightsRecord(
                name="imagenet",
                source="hf-hub:timm/pnasnet5large.tf_in1k::model.safetensors",
                sha256=None,
                normalisation=Normalisation("RGB scaled to [-1, 1]", 1.0 / 255.0,
                                            (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                notes="timm's pnasnet5large.tf_in1k: the TF-slim NASNet-family checkpoint ported by "
                      "timm (trained at 331 px, 82.8% top-1); TF 'same' padding. Fetched from the "
                      "Hugging Face hub cache; the classifier (last_linear) is not loaded."),
        },
        default_weights="imagenet",
        description="PNASNet-5-Large (timm), cells 5, 7, 9, 11. At 299 px cells 5 and 7 are 19×19, "
                    "cells 9 and 11 are 10×10 (resized to 19×19).",
    )
    dropped_prefixes = ("last_linear.",)

    def build(self) -> nn.Module:
        import timm

        return timm.create_model("pnasnet5large", pretrained=False, num_classes=0)

    def fetch(self, record: WeightsRecord) -> Path:
        return fetch_hf_hub(self.spec, record)
