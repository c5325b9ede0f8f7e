"""From a training run to a model package: export, parity, evaluation, manifest, model card."""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from dicomai.model.drift import make_reference
from dicomai.model.package import ModelPackage, OperatingPoints
from dicomai.train.card import write_model_card
from dicomai.train.data import Sample, load_display
from dicomai.train.evaluate import evaluate_package
from dicomai.train.export import (
    check_storage,
    export_package,
    parity,
    storage_parity,
    store_weights,
    write_manifest,
)
from dicomai.train.nets import load_run

__all__ = ["release"]


def _training(summary: dict[str, Any]) -> dict[str, Any]:
    """The manifest's and model card's ``training`` block from a run's ``history.json``."""
    cfg = summary["config"]
    if cfg["backbone"] == "ensemble":
        members = [_training(m) for m in summary["members"]]
        return {
            "backbone": "ensemble", "head": "linear", "output_stride": cfg["output_stride"],
            "members": members, "pretrained": all(m["pretrained"] for m in members),
            "box_weight": max(m["box_weight"] for m in members),
            "gradcam_member": cfg.get("gradcam_member"),
            "best_val_auroc": summary["best_val_auroc"],
            "seconds": sum(m["seconds"] for m in members), "train_images": members[0]["train_images"],
            "data": members[0]["data"], "hardware": members[0]["hardware"],
        }
    return {
        "backbone": cfg["backbone"], "head": cfg.get("head", "linear"),
        "output_stride": cfg.get("output_stride", 32), "box_weight": cfg.get("box_weight", 0.0),
        "box_phases": cfg.get("box_phases", "both"),
        "pretrained": cfg.get("pretrained", True), "tune_blocks": cfg["tune_blocks"], "seed": cfg["seed"],
        "best_epoch": summary["best_epoch"], "best_val_auroc": summary["best_val_auroc"],
        "seconds": summary["seconds"], "train_images": summary["train_images"],
        "data": "FracAtlas (CC BY 4.0), project copy, split train/val/test from labels.csv",
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{summary['threads']} torch threads, device {summary.get('device', 'cpu')}",
        "epochs": len(summary["history"]),
    }


def release(fit_dir: Path, samples: list[Sample], package_dir: Path, name: str, version: str,
            parity_images: int = 8, weights: str = "float32", storage_images: int | None = None,
            ) -> tuple[ModelPackage, dict[str, Any]]:
    """Export the best checkpoint of ``fit_dir`` (``train fit`` or ``train ensemble``) with its figures.

    Parity with PyTorch and the grad-cam package is checked on the float32 export; with
    ``weights="float16"`` the package is then written with half-precision weights, compared
    with that float32 export on the validation images (the first ``storage_images`` of them
    when given), and evaluated as shipped.
    """
    check_storage(weights)  # before the export and before anything lands in package_dir
    net, summary = load_run(fit_dir)
    size = int(summary["config"]["size"])
    training = _training(summary)
    provisional = {"high_sensitivity": 0.5, "high_specificity": 0.5}
    some = [load_display(s.path) for s in samples if s.split == "val"][:parity_images]
    with tempfile.TemporaryDirectory() as tmp:
        # the float32 export: the package itself, or the reference a compressed package is compared with
        reference = export_package(net, package_dir if weights == "float32" else Path(tmp), name, version,
                                   size, provisional, training, {})
        checks: dict[str, Any] = parity(net, reference, some)
        package = reference
        if weights != "float32":  # the reference file, stored compressed (no second export)
            package_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(reference.onnx_path, package_dir / "model.onnx")
            store_weights(package_dir / "model.onnx", weights)
            package = write_manifest(package_dir, name, version, size, provisional, training, {}, weights)
            more = [load_display(s.path) for s in samples if s.split == "val"][:storage_images]
            checks["storage"] = storage_parity(reference, package, more)
    evaluation = evaluate_package(package, samples, package_dir / "evaluation")
    metrics = {"test": evaluation["test"], "val_auroc": evaluation["val"]["auroc"], "val": evaluation["val"],
               "parity": checks}
    # the drift watch's reference: validation scores (as evaluated) and displayed intensities
    val = [s for s in samples if s.split == "val"]
    with np.load(package_dir / "evaluation" / "predictions.npz") as saved:
        p_val = [float(p) for p in saved["p_val"]]
    drift_reference = make_reference(p_val, [float(load_display(s.path).mean()) for s in val],
                                     OperatingPoints(**evaluation["operating_points"]),
                                     data=f"validation split, {len(val)} images, scored by `train release`")
    # the figures' own file: only the manifest is rewritten, with the operating points and figures
    package = write_manifest(package_dir, name, version, size, evaluation["operating_points"], training,
                             metrics, weights, drift_reference.model_dump())
    write_model_card(package, evaluation, training, package_dir / "MODEL_CARD.md")
    return package, {"evaluation": evaluation, "parity": checks}
