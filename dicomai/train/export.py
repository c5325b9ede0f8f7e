"""ONNX export with the Grad-CAM map in the graph, the manifest, and parity checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicomai.model.classifier import Classifier, preprocess
from dicomai.model.package import WEIGHT_STORAGE, ModelPackage, load_package, sha256_file
from dicomai.train.nets import IMAGENET_MEAN, IMAGENET_STD, EnsembleFeatures, ExportWrapper, FractureNet

__all__ = ["check_storage", "export_package", "gradcam_layer", "parity", "storage_parity", "store_weights",
           "write_manifest"]

#: The Body Part Examined terms (PS3.16 CID 4031) of FracAtlas's regions, what a model
#: trained on it is validated for: hand, leg, hip, shoulder. Forearm, elbow, humerus, femur
#: and the catch-alls are left out (the model card of the shipped model says why).
FRACTURE_BODY_PARTS = ["HAND", "HANDS", "FINGER", "THUMB", "WRIST", "LEG", "LOWERLEG", "TIBIA", "FIBULA",
                       "KNEE", "ANKLE", "FOOT", "FEET", "TOE", "HIP", "PELVIS", "SHOULDER"]


def export_package(net: FractureNet, directory: Path, name: str, version: str, size: int,
                   operating_points: dict[str, float], training: dict[str, Any],
                   metrics: dict[str, Any], weights: str = "float32") -> ModelPackage:
    """Write ``model.onnx`` (opset 17, dynamic batch) and ``model.json``; return the package.

    ``weights="float16"`` stores the weights at half precision (half the file); the graph
    still computes in float32 (see :func:`_store_float16`).
    """
    check_storage(weights)  # before anything is written
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(net).eval()
    torch.onnx.export(wrapper, (torch.zeros(1, 3, size, size),), str(directory / "model.onnx"),
                      input_names=["input"], output_names=["probabilities", "gradcam"],
                      dynamic_axes={"input": {0: "N"}, "probabilities": {0: "N"}, "gradcam": {0: "N"}},
                      opset_version=17, dynamo=False)
    store_weights(directory / "model.onnx", weights)
    return write_manifest(directory, name, version, size, operating_points, training, metrics, weights)


def store_weights(path: Path, weights: str) -> None:
    """Store the weights of the float32 export at ``path`` as ``weights`` says (in place)."""
    check_storage(weights)
    if weights == "float16":
        _store_float16(path)


def check_storage(weights: str) -> None:
    if weights not in WEIGHT_STORAGE:
        raise ValueError(f"weights must be one of {WEIGHT_STORAGE}, not {weights!r}")


def write_manifest(directory: Path, name: str, version: str, size: int, operating_points: dict[str, float],
                   training: dict[str, Any], metrics: dict[str, Any], weights: str,
                   reference: dict[str, Any] | None = None) -> ModelPackage:
    """Write ``model.json`` for the ``model.onnx`` already in ``directory``; return the package.
    ``reference``: the validation set's distributions for the drift watch."""
    manifest = {
        "name": name, "version": version, "sha256": sha256_file(directory / "model.onnx"),
        "input": {"name": "input", "height": size, "width": size, "channels": 3, "layout": "NCHW"},
        "preprocessing": {"resize": "letterbox", "pad_value": 0.0, "mean": IMAGENET_MEAN,
                          "std": IMAGENET_STD},
        "outputs": {"probabilities": "probabilities", "gradcam": "gradcam"},
        "labels": ["normal", "fractured"], "positive_class": "fractured",
        "operating_points": operating_points, "body_parts": FRACTURE_BODY_PARTS,
        "weights": weights, "training": training, "metrics": metrics,
    }
    if reference is not None:
        manifest["reference"] = reference
    (directory / "model.json").write_text(json.dumps(manifest, indent=2))
    return load_package(directory)


def _store_float16(path: Path, min_elements: int = 64, max_subnormal: float = 0.01) -> None:
    """Store the float32 weight tensors of ``path`` as float16, each behind a Cast to float32.

    Every operator still sees float32 tensors, so the arithmetic is the float32 graph's on
    weights rounded to half precision; onnxruntime folds the casts once when it loads the
    model, so inference costs the same. Two kinds of tensor stay float32: small ones (shapes,
    scalars), which weigh nothing, and those with at least ``max_subnormal`` of their nonzero
    values below float16's smallest normal number (2**-14), which would lose most of their
    digits; with batch norm folded in, the stems' weights are such (on the shipped ensemble,
    rounding those too moved some Grad-CAM maps to r = 0.03 against float32, keeping them
    float32 gave r >= 0.99 on every validation image). onnxconverter-common's float16
    converter was not used: it moves the arithmetic to float16 too, which onnxruntime's CPU
    kernels mostly lack (it would add casts around every operator).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT or int(np.prod(init.dims)) < min_elements:
            kept.append(init)
            continue
        value = numpy_helper.to_array(init)
        nonzero = np.abs(value[value != 0])
        if nonzero.size and (nonzero < np.finfo(np.float16).smallest_normal).mean() >= max_subnormal:
            kept.append(init)
            continue
        half = value.astype(np.float16)
        if not np.isfinite(half).all():
            raise ValueError(f"weight {init.name} does not fit in float16 (max |w| {np.abs(value).max():g})")
        kept.append(numpy_helper.from_array(half, f"{init.name}.fp16"))
        casts.append(helper.make_node("Cast", [f"{init.name}.fp16"], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}.to_float32"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


class _Logits(nn.Module):
    def __init__(self, net: FractureNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)[:, None]
        return logits


def gradcam_layer(net: FractureNet) -> nn.Module:
    """The layer whose output the exported Grad-CAM is taken at: the last stage, or one member's."""
    features = net.features
    if isinstance(features, EnsembleFeatures) and features.gradcam_member is not None:
        return features.members[features.gradcam_member]
    return features


def parity(net: FractureNet, package: ModelPackage, images: list[np.ndarray]) -> dict[str, float]:
    """ONNX vs PyTorch probabilities, and ONNX Grad-CAM vs the grad-cam package's GradCAM."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net.eval()
    # One run for all: the graph's dynamic batch axis is part of what is checked.
    clf = Classifier(package, providers=["CPUExecutionProvider"], max_batch=max(1, len(images)))
    inputs = [preprocess(img, package) for img in images]
    outs = clf.predict(inputs)
    x = torch.from_numpy(np.stack([i.tensor for i in inputs]))
    with torch.no_grad():
        p_torch = torch.sigmoid(net(x)).numpy()
    p_onnx = np.array([o.probability for o in outs])
    cam_tool = GradCAM(model=_Logits(net), target_layers=[gradcam_layer(net)])
    ref = cam_tool(input_tensor=x, targets=[ClassifierOutputTarget(0)] * len(inputs))  # N x H x W, resized
    rs = []
    for o, r in zip(outs, ref, strict=True):
        assert o.gradcam is not None
        ours = torch.nn.functional.interpolate(torch.from_numpy(o.gradcam)[None, None], size=r.shape,
                                               mode="bilinear", align_corners=False)[0, 0].numpy()
        if ours.std() > 0 and r.std() > 0:
            rs.append(float(np.corrcoef(ours.ravel(), r.ravel())[0, 1]))
    return {"max_abs_prob_diff": float(np.abs(p_onnx - p_torch).max()),
            "gradcam_pearson_min": min(rs) if rs else float("nan"),
            "gradcam_compared": len(rs)}


def storage_parity(reference: ModelPackage, package: ModelPackage,
                   images: list[np.ndarray]) -> dict[str, float]:
    """A package with compressed weights against the float32 export of the same network."""
    ref = Classifier(reference, providers=["CPUExecutionProvider"])
    clf = Classifier(package, providers=["CPUExecutionProvider"])
    p_ref, p_new, rs = [], [], []
    for img in images:
        (a,) = ref.predict([preprocess(img, reference)])
        (b,) = clf.predict([preprocess(img, package)])
        p_ref.append(a.probability)
        p_new.append(b.probability)
        if a.gradcam is not None and b.gradcam is not None and a.gradcam.std() > 0 and b.gradcam.std() > 0:
            rs.append(float(np.corrcoef(a.gradcam.ravel(), b.gradcam.ravel())[0, 1]))
    return {"max_abs_prob_diff": float(np.abs(np.array(p_ref) - np.array(p_new)).max()),
            "gradcam_pearson_min": min(rs) if rs else float("nan"), "images": len(images),
            "gradcam_compared": len(rs), "onnx_bytes": (package.directory / "model.onnx").stat().st_size,
            "reference_onnx_bytes": (reference.directory / "model.onnx").stat().st_size}
