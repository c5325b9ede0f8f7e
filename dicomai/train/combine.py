"""Released packages joined into one ensemble graph, without their training runs.

``train ensemble`` joins ``train fit`` runs: it needs each member's PyTorch checkpoint. Once a
package is released only its ONNX graph is left, so adding a member to a shipped ensemble would
mean retraining every member. ``combine_onnx`` joins the graphs instead: each package's logit
(the input of the sigmoid behind its probabilities) is weighted by the number of networks the
package holds, so the result is the mean logit over all of them, the same ensemble that ``train
ensemble`` would build from the runs. The map is one package's own, unchanged (as ``--gradcam-from``
takes one member's); the other packages' map nodes are left out, their scores kept. Weights are
shared as stored (float16 stays float16). ``train stitch`` can then refine that map.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, compose, helper, numpy_helper

from dicomai.model.classifier import preprocess
from dicomai.model.package import ModelPackage
from dicomai.train.data import Sample, load_display
from dicomai.train.evaluate import finish_package

__all__ = ["combine_onnx", "combine_package", "find_logit", "networks_in"]


def networks_in(package: ModelPackage) -> int:
    """How many networks a package's logit averages: an ensemble's members, else 1."""
    return len(package.manifest.training.get("members") or [None])


def find_logit(model: onnx.ModelProto, probabilities: str) -> str:
    """The tensor behind ``probabilities = [1 - sigmoid(z), sigmoid(z)]``, as ``train release`` exports it."""
    producer = {o: n for n in model.graph.node for o in n.output}
    frontier, seen = [probabilities], set()
    for _ in range(4):  # Concat <- Unsqueeze <- Sub <- Sigmoid
        found = [producer[t] for t in frontier if t in producer and producer[t].op_type == "Sigmoid"]
        if found:
            if len({n.input[0] for n in found}) != 1:
                break
            return str(found[0].input[0])
        seen.update(frontier)
        frontier = [i for t in frontier if t in producer for i in producer[t].input if i and i not in seen]
    raise ValueError(f"{probabilities!r} is not [1 - sigmoid(z), sigmoid(z)] of one logit: "
                     "not a graph dicomai exports")


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))


def _needed(nodes: list[onnx.NodeProto], outputs: Sequence[str]) -> list[onnx.NodeProto]:
    """The nodes that ``outputs`` depend on, in their order."""
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    keep, todo = set(), list(outputs)
    while todo:
        i = producer.get(todo.pop())
        if i is not None and i not in keep:
            keep.add(i)
            todo.extend(nodes[i].input)
    return [n for i, n in enumerate(nodes) if i in keep]


def combine_onnx(models: Sequence[onnx.ModelProto], networks: Sequence[int], input_name: str,
                 probabilities: str, gradcam: str, gradcam_from: int) -> onnx.ModelProto:
    """One graph: probabilities of the mean logit over all ``networks``; ``models[gradcam_from]``'s map."""
    if len(models) < 2 or len(models) != len(networks) or not 0 <= gradcam_from < len(models):
        raise ValueError("need at least two graphs, a network count for each, and the map's graph among them")
    opsets = {o.version for m in models for o in m.opset_import if o.domain in ("", "ai.onnx")}
    if len(opsets) != 1:
        raise ValueError(f"the graphs use different opsets {sorted(opsets)}")
    shapes = {str(m.graph.input[0].type.tensor_type.shape.dim[1:]) for m in models}
    if len(shapes) != 1 or any(m.graph.input[0].name != input_name for m in models):
        raise ValueError(f"the graphs take different inputs: {sorted(shapes)}")
    total = float(sum(networks))
    nodes: list[onnx.NodeProto] = []
    initializers: list[onnx.TensorProto] = []
    logits = []
    for i, model in enumerate(models):
        prefix = f"member_{i}/"
        logit = find_logit(model, probabilities)
        renamed = compose.add_prefix(model, prefix, rename_inputs=False)
        nodes += renamed.graph.node
        initializers += renamed.graph.initializer
        nodes += [_const(prefix + "share", np.array(networks[i] / total, np.float32)),
                  helper.make_node("Mul", [prefix + logit, prefix + "share"], [prefix + "weighted_logit"])]
        logits.append(prefix + "weighted_logit")
    map_prefix = f"member_{gradcam_from}/"
    nodes += [
        helper.make_node("Sum", logits, ["combined/logit"]),
        helper.make_node("Sigmoid", ["combined/logit"], ["combined/positive"]),
        _const("combined/one", np.array(1, np.float32)),
        helper.make_node("Sub", ["combined/one", "combined/positive"], ["combined/negative"]),
        _const("combined/axis", np.array([1], np.int64)),
        helper.make_node("Unsqueeze", ["combined/negative", "combined/axis"], ["combined/negative_column"]),
        helper.make_node("Unsqueeze", ["combined/positive", "combined/axis"], ["combined/positive_column"]),
        helper.make_node("Concat", ["combined/negative_column", "combined/positive_column"], [probabilities],
                         axis=1),
    ]
    for node in nodes:  # the map is the map package's own tensor, renamed (a later stitch finds its form)
        node.output[:] = [gradcam if o == map_prefix + gradcam else o for o in node.output]
    nodes = _needed(nodes, [probabilities, gradcam])
    used = {i for n in nodes for i in n.input}
    map_output = next(o for o in models[gradcam_from].graph.output if o.name == gradcam)
    outputs = [next(o for o in models[0].graph.output if o.name == probabilities), map_output]
    graph = helper.make_graph(nodes, "combined", [models[0].graph.input[0]], outputs,
                              [t for t in initializers if t.name in used])
    result = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opsets.pop())],
                               producer_name="dicomai.combine")
    result.ir_version = min(m.ir_version for m in models)
    onnx.checker.check_model(result)
    return result


def _logits(path: Path, input_name: str, probabilities: str, x: np.ndarray) -> np.ndarray:
    model = onnx.load(str(path))
    logit = find_logit(model, probabilities)
    model.graph.output.append(helper.make_tensor_value_info(logit, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run([logit], {input_name: x})[0], np.float64).reshape(len(x))


def check_combined(packages: Sequence[ModelPackage], combined: Path, gradcam_from: int,
                   tensors: np.ndarray) -> dict[str, Any]:
    """The joined graph against each package run on its own: probabilities from the mean logit,
    computed here, and the map package's map."""
    m = packages[0].manifest
    networks = [networks_in(p) for p in packages]
    z = sum(n * _logits(p.onnx_path, m.input.name, m.outputs.probabilities, tensors)
            for n, p in zip(networks, packages, strict=True)) / sum(networks)
    expected = 1.0 / (1.0 + np.exp(-z))
    session = ort.InferenceSession(str(combined), providers=["CPUExecutionProvider"])
    names = [m.outputs.probabilities, str(m.outputs.gradcam)]
    p, cam = session.run(names, {m.input.name: tensors})
    own = ort.InferenceSession(str(packages[gradcam_from].onnx_path), providers=["CPUExecutionProvider"])
    cam_own = own.run([names[1]], {m.input.name: tensors})[0]
    peak = max(float(np.abs(cam_own).max()), 1e-12)
    return {"images": len(tensors), "max_abs_prob_diff": float(np.abs(p[:, 1] - expected).max()),
            "max_rel_gradcam_diff": float(np.abs(cam - cam_own).max()) / peak}


def _same_preprocessing(packages: Sequence[ModelPackage]) -> None:
    first = packages[0].manifest
    for p in packages[1:]:
        m = p.manifest
        fields = ("input", "preprocessing", "outputs", "labels", "positive_class", "weights")
        if any(getattr(m, f) != getattr(first, f) for f in fields):
            raise ValueError(f"{p.directory} differs from {packages[0].directory} in input, preprocessing, "
                             "outputs, labels or weight storage: release them alike")
        if not m.outputs.gradcam:
            raise ValueError(f"{p.directory}: no Grad-CAM output")


def combine_package(packages: Sequence[ModelPackage], samples: list[Sample], out_dir: Path, name: str,
                    version: str, gradcam_from: int, check_images: int = 8
                    ) -> tuple[ModelPackage, dict[str, Any]]:
    """Join, check against the packages, evaluate (operating points on validation), manifest, model card."""
    _same_preprocessing(packages)
    m = packages[0].manifest
    networks = [networks_in(p) for p in packages]
    model = combine_onnx([onnx.load(str(p.onnx_path)) for p in packages], networks, m.input.name,
                         m.outputs.probabilities, str(m.outputs.gradcam), gradcam_from)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_dir / "model.onnx"))
    tensors = np.stack([preprocess(load_display(s.path), packages[0]).tensor
                        for s in [s for s in samples if s.split == "val"][:check_images]])
    check = check_combined(packages, out_dir / "model.onnx", gradcam_from, tensors)
    if check["max_abs_prob_diff"] > 1e-5 or check["max_rel_gradcam_diff"] > 1e-5:
        raise ValueError(f"the joined graph does not match its packages: {check}")
    members: list[dict[str, Any]] = []
    for p in packages:
        t = p.manifest.training
        members += t.get("members") or [{k: v for k, v in t.items() if k != "gradcam_map"}]
    source = packages[gradcam_from].manifest.training
    if source.get("members") and source.get("gradcam_member") is None:
        raise ValueError(f"{packages[gradcam_from].directory}: its map is taken over all its members; the "
                         "map's package must be one network or an ensemble explained at one member")
    first = sum(networks[:gradcam_from])
    training = {
        "backbone": "ensemble", "head": "linear", "members": members,
        "gradcam_member": first + int(source.get("gradcam_member") or 0),
        "output_stride": source.get("output_stride", 32), "pretrained": True,
        "box_weight": source.get("box_weight", 0.0),
        "combined_from": [{"name": p.manifest.name, "version": p.manifest.version,
                           "sha256": p.manifest.sha256, "networks": n}
                          for p, n in zip(packages, networks, strict=True)],
        "seconds": sum(float(p.manifest.training.get("seconds", 0)) for p in packages),
        "train_images": source.get("train_images"), "data": source.get("data"),
        "hardware": " / ".join(dict.fromkeys(str(p.manifest.training.get("hardware")) for p in packages)),
    }
    if "gradcam_map" in source:
        training["gradcam_map"] = source["gradcam_map"]
    manifest = m.model_dump(mode="json")
    manifest.update(name=name, version=version)
    result, evaluation = finish_package(out_dir, manifest, training, {"combine": check}, samples,
                                       val_auroc_in_training=True)
    return result, {"evaluation": evaluation, "check": check}
