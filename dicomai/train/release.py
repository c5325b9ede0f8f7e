"""From a training run to a model package: export, parity, evaluation, manifest, model card."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from dicomai.model import ModelPackage
from dicomai.train.data import Sample, load_display
from dicomai.train.evaluate import evaluate_package, write_model_card
from dicomai.train.export import export_package, parity
from dicomai.train.nets import build

__all__ = ["release"]


def release(fit_dir: Path, samples: list[Sample], package_dir: Path, name: str, version: str,
            parity_images: int = 8) -> tuple[ModelPackage, dict[str, Any]]:
    """Export the best checkpoint of ``fit_dir`` into ``package_dir`` with its figures."""
    summary = json.loads((fit_dir / "history.json").read_text())
    cfg = summary["config"]
    net = build(cfg["backbone"], pretrained=False, head=cfg.get("head", "linear"),
                output_stride=cfg.get("output_stride", 32))
    net.load_state_dict(torch.load(fit_dir / "best.pt", map_location="cpu"))
    net.eval()
    training: dict[str, Any] = {
        "backbone": cfg["backbone"], "head": cfg.get("head", "linear"),
        "output_stride": cfg.get("output_stride", 32), "box_weight": cfg.get("box_weight", 0.0),
        "pretrained": cfg.get("pretrained", True), "tune_blocks": cfg["tune_blocks"], "seed": cfg["seed"],
        "best_epoch": summary["best_epoch"], "best_val_auroc": summary["best_val_auroc"],
        "seconds": summary["seconds"], "train_images": summary["train_images"],
        "data": "FracAtlas (CC BY 4.0), project copy, split train/val/test from labels.csv",
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                    f"{summary['threads']} torch threads, device {summary.get('device', 'cpu')}",
        "epochs": len(summary["history"]),
    }
    provisional = {"high_sensitivity": 0.5, "high_specificity": 0.5}
    package = export_package(net, package_dir, name, version, cfg["size"], provisional, training, {})
    some = [load_display(s.path) for s in samples if s.split == "val"][:parity_images]
    checks = parity(net, package, some)
    evaluation = evaluate_package(package, samples, package_dir / "evaluation")
    metrics = {"test": evaluation["test"], "val_auroc": evaluation["val"]["auroc"], "parity": checks}
    package = export_package(net, package_dir, name, version, cfg["size"],
                             evaluation["operating_points"], training, metrics)
    write_model_card(package, evaluation, training, package_dir / "MODEL_CARD.md")
    return package, {"evaluation": evaluation, "parity": checks}
