"""ONNX export with the Grad-CAM map in the graph, the manifest, and parity checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicomai.infer import Classifier, preprocess
from dicomai.model import ModelPackage, load_package, sha256_file
from dicomai.train.nets import IMAGENET_MEAN, IMAGENET_STD, ExportWrapper, FractureNet

__all__ = ["export_package", "parity"]

FRACTURE_BODY_PARTS = ["HAND", "HANDS", "FINGER", "THUMB", "WRIST", "FOREARM", "ELBOW", "ARM", "HUMERUS",
                       "SHOULDER", "CLAVICLE", "SCAPULA", "HIP", "PELVIS", "FEMUR", "UPPERLEG", "KNEE",
                       "PATELLA", "LEG", "LOWERLEG", "TIBIA", "FIBULA", "ANKLE", "FOOT", "FEET", "TOE",
                       "HEEL", "CALCANEUS", "EXTREMITY", "UPPEREXTREMITY", "LOWEREXTREMITY"]


def export_package(net: FractureNet, directory: Path, name: str, version: str, size: int,
                   operating_points: dict[str, float], training: dict[str, Any],
                   metrics: dict[str, Any]) -> ModelPackage:
    """Write ``model.onnx`` (opset 17, dynamic batch) and ``model.json``; return the package."""
    directory.mkdir(parents=True, exist_ok=True)
    wrapper = ExportWrapper(net).eval()
    torch.onnx.export(wrapper, (torch.zeros(1, 3, size, size),), str(directory / "model.onnx"),
                      input_names=["input"], output_names=["probabilities", "gradcam"],
                      dynamic_axes={"input": {0: "N"}, "probabilities": {0: "N"}, "gradcam": {0: "N"}},
                      opset_version=17, dynamo=False)
    manifest = {
        "name": name, "version": version, "sha256": sha256_file(directory / "model.onnx"),
        "input": {"name": "input", "height": size, "width": size, "channels": 3, "layout": "NCHW"},
        "preprocessing": {"resize": "letterbox", "pad_value": 0.0, "mean": IMAGENET_MEAN,
                          "std": IMAGENET_STD},
        "outputs": {"probabilities": "probabilities", "gradcam": "gradcam"},
        "labels": ["normal", "fractured"], "positive_class": "fractured",
        "operating_points": operating_points, "body_parts": FRACTURE_BODY_PARTS,
        "training": training, "metrics": metrics,
    }
    (directory / "model.json").write_text(json.dumps(manifest, indent=2))
    return load_package(directory)


class _Logits(nn.Module):
    def __init__(self, net: FractureNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.net(x)[:, None]
        return logits


def parity(net: FractureNet, package: ModelPackage, images: list[np.ndarray]) -> dict[str, float]:
    """ONNX vs PyTorch probabilities, and ONNX Grad-CAM vs the grad-cam package's GradCAM."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net.eval()
    clf = Classifier(package, providers=["CPUExecutionProvider"])
    inputs = [preprocess(img, package) for img in images]
    outs = clf.predict(inputs)
    x = torch.from_numpy(np.stack([i.tensor for i in inputs]))
    with torch.no_grad():
        p_torch = torch.sigmoid(net(x)).numpy()
    p_onnx = np.array([o.probability for o in outs])
    cam_tool = GradCAM(model=_Logits(net), target_layers=[net.features])
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
