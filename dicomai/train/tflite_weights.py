"""MobileNetV2 initialised from a uint8 TFLite ImageNet model (the published recipe's weights).

The TFLite file holds the convolutions with their batch norms folded in (weights and int32
biases, per-tensor or per-channel affine quantization). The tensors are dequantized into
torchvision's ``mobilenet_v2`` in graph order: each convolution takes the weights, and the
batch norm after it becomes the folded bias, so that in eval mode the network computes
exactly the TFLite function up to activation quantization (TF's asymmetric "SAME" padding
is reproduced). For fine-tuning, :func:`calibrate_batchnorm` gives each batch norm the statistics
of its input on real images, so that switching to batch statistics changes little.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["calibrate_batchnorm", "fold_input_normalization", "load_tflite_convs", "mobilenet_v2_from_tflite"]

_CONV_2D, _DEPTHWISE_CONV_2D = 3, 4


def _bn(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(running mean, running variance, weight, bias) of an affine batch norm with statistics."""
    rm, rv, w, b = bn.running_mean, bn.running_var, bn.weight, bn.bias
    assert rm is not None and rv is not None and w is not None and b is not None
    return rm, rv, w, b


def _dequantize(model: object, graph: object, index: int) -> np.ndarray:
    t = graph.Tensors(index)  # type: ignore[attr-defined]
    raw = model.Buffers(t.Buffer()).DataAsNumpy()  # type: ignore[attr-defined]
    shape = tuple(int(s) for s in t.ShapeAsNumpy())
    dtype = {3: np.uint8, 2: np.int32, 0: np.float32, 9: np.int8}[t.Type()]
    values = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(shape).astype(np.float64)
    if t.Type() == 0:
        return values
    q = t.Quantization()
    scale = q.ScaleAsNumpy().astype(np.float64)
    zero = q.ZeroPointAsNumpy().astype(np.float64)
    if scale.size > 1:  # per-channel along QuantizedDimension
        axis = q.QuantizedDimension()
        bshape = [1] * values.ndim
        bshape[axis] = -1
        scale, zero = scale.reshape(bshape), zero.reshape(bshape)
    out: np.ndarray = (values - zero) * scale
    return out


def load_tflite_convs(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Every convolution of the graph in order: (kind, weight OIHW float, bias float)."""
    import tflite

    model = tflite.Model.GetRootAsModel(path.read_bytes(), 0)
    graph = model.Subgraphs(0)
    convs = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        oc = model.OperatorCodes(op.OpcodeIndex())
        code = max(oc.BuiltinCode(), oc.DeprecatedBuiltinCode())
        if code not in (_CONV_2D, _DEPTHWISE_CONV_2D):
            continue
        _, w_idx, b_idx = (int(x) for x in op.InputsAsNumpy()[:3])
        w = _dequantize(model, graph, w_idx)
        b = _dequantize(model, graph, b_idx)
        if code == _CONV_2D:  # [out, kh, kw, in] -> [out, in, kh, kw]
            convs.append(("conv", w.transpose(0, 3, 1, 2), b))
        else:  # depthwise [1, kh, kw, channels] -> [channels, 1, kh, kw]
            convs.append(("depthwise", w.transpose(3, 0, 1, 2), b))
    return convs


def mobilenet_v2_from_tflite(path: Path | None, num_classes: int = 1001) -> nn.Module:
    """torchvision ``mobilenet_v2`` holding the TFLite model's weights (eval-mode exact).

    With ``num_classes=1001`` the classifier is the TFLite one (index 0 = background), which
    is how the conversion is checked; the fracture model only uses ``.features``. The model
    expects inputs scaled to [-1, 1] until :func:`fold_input_normalization` is applied.
    """
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights=None, num_classes=num_classes)
    if path is None:  # the same structure, randomly initialised (training from scratch)
        _tf_same_padding(net.features)
        return net  # type: ignore[no-any-return]
    convs = load_tflite_convs(path)
    pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = []
    modules = list(net.features.modules())
    for i, m in enumerate(modules):
        if isinstance(m, nn.Conv2d):
            bn = next(x for x in modules[i + 1:] if isinstance(x, nn.BatchNorm2d))
            pairs.append((m, bn))
    if len(convs) != len(pairs) + 1:
        raise ValueError(f"{path.name}: {len(convs)} convolutions, expected {len(pairs) + 1} for MobileNetV2")
    with torch.no_grad():
        for (kind, w, b), (conv, bn) in zip(convs, pairs, strict=False):
            if tuple(conv.weight.shape) != w.shape or (kind == "depthwise") != (conv.groups > 1):
                raise ValueError(f"{path.name}: tensor {w.shape} does not fit {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(w))
            rm, rv, bw, bb = _bn(bn)
            rm.zero_()
            rv.fill_(1.0 - bn.eps)
            bw.fill_(1.0)
            bb.copy_(torch.from_numpy(b))
        _, w, b = convs[-1]  # logits: 1x1 convolution over the pooled features
        if num_classes == w.shape[0]:
            linear = net.classifier[1]
            linear.weight.copy_(torch.from_numpy(w[:, :, 0, 0]))
            linear.bias.copy_(torch.from_numpy(b))
    _tf_same_padding(net.features)
    result: nn.Module = net.float()
    return result


def _tf_same_padding(features: nn.Module) -> None:
    """TF "SAME" padding for the stride-2 convolutions: one row/column after, none before.

    torchvision pads 3x3 stride-2 convolutions by one on every side, which shifts the grid by a
    pixel against the TFLite model (its outputs then agree only to r ~ 0.8 on some images).
    Exact for even input sizes (every size that is a multiple of 32).
    """
    for parent in list(features.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.stride == (2, 2) and child.kernel_size == (3, 3):
                child.padding = (0, 0)
                setattr(parent, name, nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), child))


def fold_input_normalization(net: nn.Module, mean: list[float], std: list[float]) -> None:
    """Let the first convolution take ImageNet-normalized inputs instead of [-1, 1] ones.

    TFLite's input t = 2x - 1 for x in [0, 1]; the node feeds (x - mean) / std, so
    t = 2 std * x_n + (2 mean - 1): the first convolution's weights are scaled by 2 std per
    input channel and the constant goes into the following batch norm's bias.
    """
    features: nn.Module = net.features  # type: ignore[assignment]
    conv = next(m for m in features.modules() if isinstance(m, nn.Conv2d))
    bn = next(m for m in features.modules() if isinstance(m, nn.BatchNorm2d))
    _, rv, bw, bb = _bn(bn)
    s = torch.tensor([2 * v for v in std]).view(1, 3, 1, 1)
    c = torch.tensor([2 * m - 1 for m in mean]).view(1, 3, 1, 1)
    with torch.no_grad():
        offset = (conv.weight * c).sum(dim=(1, 2, 3))
        conv.weight.mul_(s)
        bb.add_(offset * bw / torch.sqrt(rv + bn.eps))


def calibrate_batchnorm(features: nn.Module, inputs: torch.Tensor) -> None:
    """Give each batch norm the mean/variance of its input on ``inputs``, same eval output.

    With running statistics (m, v), weight sqrt(v + eps) and bias m + b, eval mode still
    computes y + b, and train mode (batch statistics close to m, v) computes about the same.
    """
    features.eval()
    stats: dict[nn.BatchNorm2d, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0]
        stats[module] = (x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False))  # type: ignore[index]

    handles = [m.register_forward_pre_hook(hook) for m in features.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        features(inputs)
        for h in handles:
            h.remove()
        for bn, (mean, var) in stats.items():
            # current eval function: (x - rm) / sqrt(rv + eps) * w + b, as an affine a * x + c
            rm, rv, bw, bb = _bn(bn)
            a = bw / torch.sqrt(rv + bn.eps)
            c = bb - rm * a
            rm.copy_(mean)
            rv.copy_(var)
            bw.copy_(a * torch.sqrt(var + bn.eps))
            bb.copy_(c + a * mean)
