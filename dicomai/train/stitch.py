"""A finer Grad-CAM from the same network: shifted copies, interpolated, rewritten into the graph.

A Grad-CAM grid has one value per cell of the last stage, and the node draws it back with
bilinear resampling, whose maximum always lies on a cell centre: on a 14x14 grid a cell is
16 px of the 224 px input, larger than most fracture boxes. Running the network's last stage
again on a copy of the input moved by a fraction of a cell samples the map between the
centres (shift-and-stitch: Long et al., "Fully convolutional networks for semantic
segmentation", 2015; Grad-CAM from shifted and augmented copies: Morbidelli et al.,
"Augmented Grad-CAM", ICASSP 2020). The samples of all copies are carried onto a grid
``factor`` times finer per axis by normalised Gaussian interpolation (Knutsson and Westin,
1993: each output cell is the Gaussian-weighted mean of the samples near it), so a few copies
are enough and the map's maximum may fall between the coarse centres.

Copies of the input enlarged to a larger size (``sizes``) add the same stage seen at a finer
scale, on a finer grid of its own: multi-scale class activation maps, as weakly supervised
localisation computes them (Ahn and Kwak, "Learning pixel-level semantic affinity with
image-level supervision", CVPR 2018: maps of several scales summed). Each scale's map is
carried onto the output grid the same way, scaled to a peak of 1, and the scales are averaged.

Only the map changes: the probabilities are the graph's own, and the unshifted sample reuses
the stage the scores already computed. Every other copy runs the part of the graph that the
map is taken at: for an ensemble explained at one member (``train ensemble --gradcam-from``)
that member alone. The weights are shared, not copied. Supported: maps of the form
``ReLU(sum_k w_k A_k)`` with ``w`` the same for every image, which is what ``train release``
exports for linear heads (Grad-CAM's weights are the head's, for global average pooling).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MapStage", "find_map_stage", "free_spatial", "gaussian_weights", "interpolation_matrices",
           "shift_pixels", "stitch_gradcam"]

PREFIX = "stitch/"


def shift_pixels(offsets: Sequence[tuple[float, float]], cell: tuple[float, float]) -> list[tuple[int, int]]:
    """Offsets in cells -> whole pixels: a copy shifted by (dy, dx) samples each cell at centre + (dy, dx)."""
    return [(round(oy * cell[0]), round(ox * cell[1])) for oy, ox in offsets]


def interpolation_matrices(grid: int, cell: float, shifts: Sequence[int], factor: int, sigma: float
                           ) -> list[np.ndarray]:
    """Per shift, the (grid * factor) x grid Gaussian weights from its samples to the fine centres.

    The samples of a copy shifted by ``s`` px lie at ``(i + 0.5) * cell + s``; the fine grid's
    centres at ``(k + 0.5) * cell / factor``; ``sigma`` is in fine cells. Separable, so a map's
    contribution is ``Gy @ M @ Gx.T``.
    """
    dst = (np.arange(grid * factor) + 0.5) * cell / factor
    px = sigma * cell / factor
    return [np.exp(-0.5 * ((dst[:, None] - ((np.arange(grid) + 0.5) * cell + s)[None, :]) / px) ** 2)
            for s in shifts]


@dataclass(frozen=True)
class MapStage:
    """Where a graph's Grad-CAM is taken: the stage tensor, its channel weights and grid."""

    stage: str
    weights: np.ndarray  # (channels,)
    grid: tuple[int, int]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], names: list[str]) -> list[np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names if n not in known)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [np.asarray(v) for v in session.run(names, feeds)]


def _depends_on_values(model: onnx.ModelProto, input_name: str) -> set[str]:
    """Tensors whose values depend on the input's values, not only on its shape (nodes are in order)."""
    dependent = {input_name}
    for node in model.graph.node:
        if node.op_type != "Shape" and dependent.intersection(node.input):
            dependent.update(node.output)
    return dependent


def find_map_stage(model: onnx.ModelProto, input_name: str, gradcam: str, input_shape: Sequence[int]
                   ) -> MapStage:
    """Find the stage and constant weights behind ``gradcam = ReLU(einsum(A, w))``, by running the graph once.

    For an ensemble explained at one member, ``A`` is a slice of the members' concatenated
    stages; the stage returned is that member's own output (the tensor equal to ``A``), so that
    a shifted copy needs that member only.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    relu = producer.get(gradcam)
    einsum = producer.get(relu.input[0]) if relu is not None and relu.op_type == "Relu" else None
    if einsum is None or einsum.op_type != "Einsum" or len(einsum.input) != 2:
        raise ValueError(f"{gradcam!r} is not ReLU(einsum(stage, weights)): not a map dicomai exports")
    a_name, w_name = einsum.input
    if w_name in _depends_on_values(model, input_name):
        raise ValueError("the Grad-CAM weights depend on the image (not a linear head): not supported")
    candidates = []
    sliced = producer.get(a_name)
    concat = producer.get(sliced.input[0]) if sliced is not None and sliced.op_type == "Slice" else None
    if concat is not None and concat.op_type == "Concat":
        for name in concat.input:
            resize = producer.get(name)
            candidates.append(resize.input[0] if resize is not None and resize.op_type == "Resize" else name)
    # the weights' independence of the image is structural (above); one run finds the stage
    x = np.random.default_rng(0).normal(size=(2, *input_shape)).astype(np.float32)
    a, w, *values = _run(model, {input_name: x}, [a_name, w_name, *candidates])
    if w.ndim != 2:
        raise ValueError(f"Grad-CAM weights of shape {w.shape}: not a map dicomai exports")
    stage = next((name for name, v in zip(candidates, values, strict=True)
                  if v.shape == a.shape and np.array_equal(v, a)), a_name)
    return MapStage(stage, w[0].astype(np.float32), (int(a.shape[2]), int(a.shape[3])))


def free_spatial(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose input and outputs take any height and width (a linear head's
    graph is fully convolutional up to its pooling)."""
    free = onnx.ModelProto()
    free.CopyFrom(model)
    for i, dim in enumerate(free.graph.input[0].type.tensor_type.shape.dim):
        if i >= 2:
            dim.ClearField("dim_value")
            dim.dim_param = f"spatial_{i}"
    for out in free.graph.output:
        for j, dim in enumerate(out.type.tensor_type.shape.dim):
            if j >= 1:
                dim.ClearField("dim_value")
                dim.dim_param = f"{out.name}_{j}"
    del free.graph.value_info[:]
    return free


def gaussian_weights(dst: np.ndarray, src: np.ndarray, px: float) -> np.ndarray:
    """Weights from samples at ``src`` to centres at ``dst`` (both in input pixels), width ``px``."""
    return np.asarray(np.exp(-0.5 * ((dst[:, None] - src[None, :]) / px) ** 2))


def _peak_scaled(name: str, out: str, opset: int) -> list[onnx.NodeProto]:
    """``out`` = ``name`` (N x h x w) over its per-image peak (an all-zero map stays zero)."""
    if opset >= 18:
        reduce = [_const(name + "/axes", np.array([1, 2], np.int64)),
                  helper.make_node("ReduceMax", [name, name + "/axes"], [name + "/peak"], keepdims=1)]
    else:
        reduce = [helper.make_node("ReduceMax", [name], [name + "/peak"], axes=[1, 2], keepdims=1)]
    return [*reduce, _const(name + "/tiny", np.array(1e-12, np.float32)),
            helper.make_node("Max", [name + "/peak", name + "/tiny"], [name + "/divisor"]),
            helper.make_node("Div", [name, name + "/divisor"], [out])]


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))


def _extract(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {v.name for v in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]}
    inferred.graph.value_info.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                     for n in outputs if n not in known)
    return onnx.utils.Extractor(inferred).extract_model(inputs, outputs)


def _renamer(part: onnx.ModelProto, input_name: str, prefix: str, new_input: str) -> Callable[[str], str]:
    """Tensor names of a copy of ``part``: its input is ``new_input``, weights shared, the rest prefixed."""
    shared = {i.name for i in part.graph.initializer}

    def renamed(name: str) -> str:
        if name == input_name:
            return new_input
        return name if not name or name in shared else prefix + name

    return renamed


def _copy_of(part: onnx.ModelProto, input_name: str, prefix: str, new_input: str) -> list[onnx.NodeProto]:
    """``part``'s nodes run on ``new_input``: tensors renamed with ``prefix``, weights shared."""
    renamed = _renamer(part, input_name, prefix, new_input)
    nodes = []
    for node in part.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = prefix + node.name
        copy.input[:] = [renamed(i) for i in node.input]
        copy.output[:] = [renamed(o) for o in node.output]
        nodes.append(copy)
    return nodes


def _carried(stage: str, tag: str, gy: np.ndarray, gx: np.ndarray, out: str) -> list[onnx.NodeProto]:
    """``out`` = ``gy @ ReLU(sum_k w_k stage_k) @ gx.T``: one copy's map, weighted onto the fine grid."""
    return [helper.make_node("Einsum", [stage, PREFIX + "weights"], [tag + "sum"], equation="nkhw,k->nhw"),
            helper.make_node("Relu", [tag + "sum"], [tag + "map"]),
            _const(tag + "gy", gy.astype(np.float32)),
            _const(tag + "gxt", np.ascontiguousarray(gx.T, np.float32)),
            helper.make_node("MatMul", [tag + "gy", tag + "map"], [tag + "rows"]),
            helper.make_node("MatMul", [tag + "rows", tag + "gxt"], [out])]


def stitch_gradcam(model: onnx.ModelProto, input_name: str, probabilities: str, gradcam: str,
                   input_shape: Sequence[int], pad_values: Sequence[float],
                   offsets: Sequence[tuple[float, float]] = ((0.0, 0.0), (0.5, 0.5)),
                   factor: int = 2, sigma: float = 1.0, sizes: Sequence[tuple[int, int]] = ()
                   ) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Return ``model`` with ``gradcam`` replaced by the interpolated map of shifted copies, and its settings.

    ``input_shape`` is (channels, height, width); ``offsets`` in cells of the map's grid, one
    copy each ((0, 0): the unshifted input); ``pad_values`` per channel, as the input tensor
    holds them (after mean/std), fill what a shift uncovers, as the letterbox's own border
    does; ``sigma`` in cells of the ``factor`` times finer output grid. ``sizes`` (height,
    width), each larger than the input: one more copy each, the input enlarged bilinearly
    (half-pixel centres) to that size; with them the map is the mean of the shifted copies'
    map and each enlarged copy's map, each scaled to a peak of 1.
    """
    if factor < 1 or not math.isfinite(sigma) or sigma <= 0 or not offsets:
        raise ValueError("need factor >= 1, sigma > 0 and at least one offset")
    for node in model.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name!r} holds a subgraph: not supported")
    channels, h, w = input_shape
    sizes = [(int(sh), int(sw)) for sh, sw in sizes]
    if any(sh < h or sw < w or (sh, sw) == (h, w) for sh, sw in sizes) or len(set(sizes)) != len(sizes):
        raise ValueError(f"sizes {sizes} must be distinct and larger than the input's {h}x{w}")
    found = find_map_stage(model, input_name, gradcam, input_shape)
    gh, gw = found.grid
    cell = (h / gh, w / gw)
    shifts = shift_pixels(offsets, cell)
    if len(set(shifts)) != len(shifts):
        raise ValueError(f"offsets {list(offsets)} give the same pixel shift twice: {shifts}")
    scores = _extract(model, [input_name], [probabilities, found.stage])
    nodes: list[onnx.NodeProto] = list(scores.graph.node)
    moved = [s for s in shifts if s != (0, 0)]
    stages = {(0, 0): found.stage}
    # the part of the graph the map is taken at (for an ensemble explained at one member: that member)
    part = _extract(model, [input_name], [found.stage]) if moved or sizes else onnx.ModelProto()
    if moved:
        margin = max(max(abs(dy), abs(dx)) for dy, dx in moved)
        fill = np.asarray(pad_values, np.float32).reshape(1, channels, 1, 1)
        nodes += [
            _const(PREFIX + "pad_values", fill),
            helper.make_node("Sub", [input_name, PREFIX + "pad_values"], [PREFIX + "centred"]),
            _const(PREFIX + "margins", np.array([0, 0, margin, margin, 0, 0, margin, margin], np.int64)),
            helper.make_node("Pad", [PREFIX + "centred", PREFIX + "margins"], [PREFIX + "padded"]),
            _const(PREFIX + "hw_axes", np.array([2, 3], np.int64)),
        ]
        windows = []
        for i, (dy, dx) in enumerate(moved):
            # the copy's pixel p is the input's p + (dy, dx): its cells sample centre + (dy, dx)
            tag = f"{PREFIX}copy_{i}"
            start = np.array([margin + dy, margin + dx], np.int64)
            nodes += [_const(tag + "/start", start), _const(tag + "/end", start + np.array([h, w], np.int64)),
                      helper.make_node("Slice", [PREFIX + "padded", tag + "/start", tag + "/end",
                                                 PREFIX + "hw_axes"], [tag + "/centred"])]
            windows.append(tag + "/centred")
        nodes += [helper.make_node("Concat", windows, [PREFIX + "copies_centred"], axis=0),
                  helper.make_node("Add", [PREFIX + "copies_centred", PREFIX + "pad_values"],
                                   [PREFIX + "copies"])]
        nodes += _copy_of(part, input_name, PREFIX, PREFIX + "copies")
        renamed = _renamer(part, input_name, PREFIX, PREFIX + "copies")
        stacked = PREFIX + "copies_stage"
        by_copy = np.array([len(moved), -1, len(found.weights), gh, gw], np.int64)
        nodes += [_const(PREFIX + "by_copy", by_copy),
                  helper.make_node("Reshape", [renamed(found.stage), PREFIX + "by_copy"], [stacked])]
        for i, shift in enumerate(moved):
            tag = f"{PREFIX}copy_{i}"
            nodes += [_const(tag + "/index", np.array(i, np.int64)),
                      helper.make_node("Gather", [stacked, tag + "/index"], [tag + "/stage"], axis=0)]
            stages[shift] = tag + "/stage"

    nodes.append(_const(PREFIX + "weights", found.weights))
    ys = interpolation_matrices(gh, cell[0], [s[0] for s in shifts], factor, sigma)
    xs = interpolation_matrices(gw, cell[1], [s[1] for s in shifts], factor, sigma)
    total = sum(gy @ np.ones((gh, gw)) @ gx.T for gy, gx in zip(ys, xs, strict=True))
    parts = []
    for i, (shift, gy, gx) in enumerate(zip(shifts, ys, xs, strict=True)):
        tag = f"{PREFIX}sample_{i}/"
        nodes += _carried(stages[shift], tag, gy, gx, tag + "fine")
        parts.append(tag + "fine")
    shifted_map = PREFIX + "shifted_map" if sizes else gradcam
    nodes += [helper.make_node("Sum", parts, [PREFIX + "weighted"]),
              _const(PREFIX + "inverse_total", (1.0 / total).astype(np.float32)),
              helper.make_node("Mul", [PREFIX + "weighted", PREFIX + "inverse_total"], [shifted_map])]
    size_grids = []
    if sizes:
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        probe = ort.InferenceSession(free_spatial(part).SerializeToString(),
                                     providers=["CPUExecutionProvider"])
        dst_y = (np.arange(gh * factor) + 0.5) * cell[0] / factor
        dst_x = (np.arange(gw * factor) + 0.5) * cell[1] / factor
        nodes += [helper.make_node("Shape", [input_name], [PREFIX + "input_shape"]),
                  _const(PREFIX + "nc_axes", np.array([0], np.int64)),
                  _const(PREFIX + "nc_end", np.array([2], np.int64)),
                  helper.make_node("Slice", [PREFIX + "input_shape", PREFIX + "nc_axes", PREFIX + "nc_end"],
                                   [PREFIX + "input_nc"])]
        groups = [PREFIX + "shifted_map/scaled"]
        nodes += _peak_scaled(shifted_map, groups[0], opset)
        for i, (sh, sw) in enumerate(sizes):
            tag = f"{PREFIX}size_{i}/"
            x = np.zeros((1, channels, sh, sw), np.float32)
            sgh, sgw = (int(d) for d in probe.run(None, {probe.get_inputs()[0].name: x})[0].shape[2:])
            size_grids.append([sgh, sgw])
            gy = gaussian_weights(dst_y, (np.arange(sgh) + 0.5) * h / sgh, sigma * cell[0] / factor)
            gx = gaussian_weights(dst_x, (np.arange(sgw) + 0.5) * w / sgw, sigma * cell[1] / factor)
            inverse = 1.0 / (gy @ np.ones((sgh, sgw)) @ gx.T)
            nodes += [_const(tag + "hw", np.array([sh, sw], np.int64)),
                      helper.make_node("Concat", [PREFIX + "input_nc", tag + "hw"], [tag + "shape"], axis=0),
                      helper.make_node("Resize", [input_name, "", "", tag + "shape"], [tag + "input"],
                                       mode="linear", coordinate_transformation_mode="half_pixel"),
                      *_copy_of(part, input_name, tag, tag + "input"),
                      *_carried(_renamer(part, input_name, tag, tag + "input")(found.stage), tag, gy, gx,
                                tag + "weighted"),
                      _const(tag + "inverse_total", inverse.astype(np.float32)),
                      helper.make_node("Mul", [tag + "weighted", tag + "inverse_total"], [tag + "fine"]),
                      *_peak_scaled(tag + "fine", tag + "scaled", opset)]
            groups.append(tag + "scaled")
        nodes += [helper.make_node("Sum", groups, [PREFIX + "scales_sum"]),
                  _const(PREFIX + "inverse_scales", np.array(1.0 / len(groups), np.float32)),
                  helper.make_node("Mul", [PREFIX + "scales_sum", PREFIX + "inverse_scales"], [gradcam])]

    initializers = {i.name: i for i in model.graph.initializer}
    used = {i for n in nodes for i in n.input}
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param or None
    outputs = [o for o in model.graph.output if o.name == probabilities]
    fine_shape = [batch, gh * factor, gw * factor]
    outputs.append(helper.make_tensor_value_info(gradcam, TensorProto.FLOAT, fine_shape))
    graph = helper.make_graph(nodes, model.graph.name, list(model.graph.input), outputs,
                              [v for k, v in initializers.items() if k in used])
    result = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name="dicomai.stitch")
    result.ir_version = model.ir_version
    onnx.checker.check_model(result)
    settings = {"method": "shifted copies, normalised Gaussian interpolation",
                "offsets_cells": [list(map(float, o)) for o in offsets],
                "shifts_px": [list(s) for s in shifts],
                "factor": factor, "sigma_fine_cells": sigma, "grid": [gh * factor, gw * factor],
                "source_grid": [gh, gw], "stage": found.stage}
    if sizes:
        settings.update(sizes=[list(z) for z in sizes], size_grids=size_grids,
                        combine="each scale's map over its peak, the scales averaged")
    return result, settings
