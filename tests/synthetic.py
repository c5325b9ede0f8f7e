"""Tiny ONNX models with known behaviour, built with onnx.helper, for tests.

The "hot spot" model: the Grad-CAM grid is the input averaged over 32x32 blocks (7x7 for a
224x224 input), and P(fractured) = sigmoid(10 * (max(grid) - 0.5)). A bright spot on a dark
image is thus "fractured", and the map's peak lies on the spot.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomai.model.package import sha256_file


def hot_spot_model(directory: Path, size: int = 224, gradcam: bool = True,
                   thresholds: tuple[float, float] = (0.3, 0.7)) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    k = size // 7
    nodes = [
        helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[k, k], strides=[k, k]),
        helper.make_node("ReduceMean", ["pooled"], ["cam"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["cam"], ["row_peak"], axes=[2], keepdims=0),
        helper.make_node("ReduceMax", ["row_peak"], ["peak"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["peak", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "ten"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["p"]),
        helper.make_node("Sub", ["one", "p"], ["q"]),
        helper.make_node("Concat", ["q", "p"], ["probabilities"], axis=1),
    ]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v])
             for n, v in (("half", 0.5), ("ten", 10.0), ("one", 1.0))]
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])]
    if gradcam:
        outputs.append(helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 7, 7]))
    graph = helper.make_graph(
        nodes, "hot_spot",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(model, directory / "model.onnx")
    manifest = {
        "name": "hot-spot-test", "version": "1.0.0", "sha256": sha256_file(directory / "model.onnx"),
        "input": {"name": "input", "height": size, "width": size, "channels": 3, "layout": "NCHW"},
        "preprocessing": {"resize": "letterbox", "pad_value": 0.0, "mean": [0, 0, 0], "std": [1, 1, 1]},
        "outputs": {"probabilities": "probabilities", "gradcam": "cam" if gradcam else None},
        "labels": ["normal", "fractured"], "positive_class": "fractured",
        "operating_points": {"high_sensitivity": thresholds[0], "high_specificity": thresholds[1]},
        "training": {"data": "synthetic"}, "metrics": {},
    }
    (directory / "model.json").write_text(json.dumps(manifest, indent=2))
    return directory
