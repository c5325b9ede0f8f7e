"""``dicomai model``: model packages (manifest, hash, graph)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dicomai.cli import ExitCode, Subparsers, json_flag
from dicomai.config import Settings

__all__ = ["cmd_model_info", "cmd_model_verify", "describe", "model_dir", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``model info`` and ``model verify``."""
    model = subparsers.add_parser("model", parents=[common], help="model packages")
    msub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    info = msub.add_parser("info", parents=[common], help="print a model package's manifest")
    info.add_argument("directory", nargs="?", type=Path, help="package folder (default: configured)")
    json_flag(info)
    info.set_defaults(func=cmd_model_info)
    verify = msub.add_parser("verify", parents=[common], help="check hash and shapes, run one input")
    verify.add_argument("directory", type=Path)
    verify.set_defaults(func=cmd_model_verify)


def model_dir(settings: Settings, given: Path | None) -> Path:
    """The package folder: ``given``, else ``model.path``, else the package shipped with dicomai."""
    from dicomai.model.package import ModelError
    from dicomai.node import default_model_dir

    path = given or settings.model.path or default_model_dir()
    if path is None:
        raise ModelError(Path("."), "no model package: give a folder or set model.path")
    return path


def cmd_model_info(args: argparse.Namespace, settings: Settings) -> int:
    """Print a package's manifest: a summary, or the whole manifest as JSON."""
    from dicomai.model.package import load_package

    pkg = load_package(model_dir(settings, args.directory), check_hash=False)
    data = pkg.manifest.model_dump(mode="json")
    if args.json:
        print(json.dumps({"directory": str(pkg.directory), **data}, indent=2))
        return ExitCode.OK
    m = pkg.manifest
    print(f"{m.name} {m.version}  ({pkg.directory})")
    print(f"sha256            {m.sha256}")
    print(f"weights           stored as {m.weights}, computed in float32")
    print(f"input             {m.input.name} {m.input.layout} {m.input.channels}x{m.input.height}"
          f"x{m.input.width}, {m.preprocessing.resize}")
    print(f"outputs           {m.outputs.probabilities}; Grad-CAM: {m.outputs.gradcam or 'none'}")
    print(f"labels            {', '.join(m.labels)} (positive: {m.positive_class})")
    print(f"operating points  doubtful >= {m.operating_points.high_sensitivity:.3f}, "
          f"positive >= {m.operating_points.high_specificity:.3f}")
    print(f"body parts        {', '.join(m.body_parts) or '(any)'}")
    training = dict(m.training)
    explained = training.pop("gradcam_member", None)
    members = training.pop("members", None)
    if members:  # an ensemble (`train ensemble`): one short line per member
        training["members"] = "; ".join(
            f"{x.get('backbone')} (val AUROC {x.get('best_val_auroc', float('nan')):.3f}, "
            f"epoch {x.get('best_epoch')} of {x.get('epochs')})"
            + (", Grad-CAM from this member" if i == explained else "")
            for i, x in enumerate(members))
    for title, section in (("training", training), ("metrics", m.metrics)):
        if section:
            print(f"\n{title}:")
            for key, value in section.items():
                print("\n".join(describe(key, value, 1)))
    return ExitCode.OK


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value and abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_scalar(v)}" for k, v in value.items())
    return str(value)


def describe(key: str, value: Any, depth: int = 0) -> list[str]:
    """``key: value`` as indented lines for a person: tables nested, numbers to 3 decimals."""
    pad = "  " * depth
    if isinstance(value, dict) and value:
        return [f"{pad}{key}:", *(line for k, v in value.items() for line in describe(k, v, depth + 1))]
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        return [f"{pad}{key}:", *(f"{pad}  - {_scalar(v)}" for v in value)]
    return [f"{pad + key:{max(28, len(pad + key) + 1)}}{_scalar(value)}"]


def cmd_model_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Check a package's hash, manifest and graph, and run one blank input through it."""
    import numpy as np

    from dicomai.model.classifier import Classifier, preprocess
    from dicomai.model.package import load_package

    pkg = load_package(args.directory)  # checks the hash and the manifest
    clf = Classifier(pkg, threads=settings.model.threads, providers=settings.model.providers)
    (out,) = clf.predict([preprocess(np.zeros((300, 200), np.float32), pkg)])
    cam = "none" if out.gradcam is None else "x".join(map(str, out.gradcam.shape))
    print(f"ok: {pkg.manifest.name} {pkg.manifest.version}; hash, manifest and graph agree; "
          f"test input -> probability {out.probability:.4f}, Grad-CAM {cam}; "
          f"providers {', '.join(clf.providers)}")
    return ExitCode.OK
