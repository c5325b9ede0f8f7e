"""The ``dicomai train`` commands (registered by :mod:`dicomai.train.cli`).

Each command imports the training modules it needs when it runs, so that this module
imports without the train extra.
"""

from __future__ import annotations

import argparse
import functools
import json
from typing import TYPE_CHECKING

from dicomai.cli import Command, ExitCode, missing_extra, print_table
from dicomai.config import Settings
from dicomai.errors import DicomaiError
from dicomai.train.reports import EnsembleSummary, Evaluation, FitSummary

if TYPE_CHECKING:
    from dicomai.train.data import Sample
    from dicomai.train.fit import FitConfig

__all__ = [
    "cmd_train_combine",
    "cmd_train_compare",
    "cmd_train_distill",
    "cmd_train_ensemble",
    "cmd_train_evaluate",
    "cmd_train_evaluate_robust",
    "cmd_train_explain",
    "cmd_train_fit",
    "cmd_train_release",
    "cmd_train_stitch",
]


def _needs_extra(func: Command) -> Command:
    """Turn a missing third-party module into the one line that names the train extra."""
    @functools.wraps(func)
    def run(args: argparse.Namespace, settings: Settings) -> int:
        try:
            return func(args, settings)
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] == "dicomai":
                raise
            return missing_extra("training", "train")
    return run


def _samples(args: argparse.Namespace) -> list[Sample]:
    from dicomai.train.data import DatasetError, load_dataset

    try:
        return load_dataset(args.dataset, args.layout, args.labels)
    except (DatasetError, OSError) as exc:
        raise DicomaiError(f"dataset: {exc}") from None


def _fit_config(args: argparse.Namespace) -> FitConfig:
    """The flags shared by ``fit`` and ``distill`` as a :class:`FitConfig`."""
    from dicomai.train.fit import FitConfig

    return FitConfig(backbone=args.backbone, head=args.head, device=args.device, size=args.size,
                     output_stride=args.output_stride,
                     head_epochs=args.head_epochs,
                     tune_epochs=args.tune_epochs, tune_blocks=args.tune_blocks, batch=args.batch,
                     limit=args.limit, pretrained=not args.no_pretrained, seed=args.seed,
                     tune_lr=args.tune_lr, patience=args.patience, box_weight=args.box_weight,
                     box_phases=args.box_phases, degrade=args.degrade, exclude_region=args.exclude_region,
                     teacher_weight=getattr(args, "teacher_weight", 0.0))


def _print_fit(summary: FitSummary, args: argparse.Namespace) -> None:
    print(f"best val AUROC {summary.best_val_auroc:.4f} at epoch {summary.best_epoch}; "
          f"{summary.seconds:.0f}s; {args.out / 'best.pt'}")


@_needs_extra
def cmd_train_fit(args: argparse.Namespace, settings: Settings) -> int:
    """Train one network (``train fit``)."""
    from dicomai.train.fit import fit

    try:
        summary = FitSummary.of(fit(_samples(args), _fit_config(args), args.out, resume=args.resume))
    except ValueError as exc:
        raise DicomaiError(f"fit: {exc}") from None
    _print_fit(summary, args)
    return ExitCode.OK


@_needs_extra
def cmd_train_distill(args: argparse.Namespace, settings: Settings) -> int:
    """Train one network on a package's probabilities (``train distill``)."""
    from dicomai.train.distill import distill

    try:
        summary = FitSummary.of(distill(_samples(args), _fit_config(args), args.out, args.teacher,
                                        resume=args.resume))
    except ValueError as exc:
        raise DicomaiError(f"distill: {exc}") from None
    _print_fit(summary, args)
    return ExitCode.OK


@_needs_extra
def cmd_train_ensemble(args: argparse.Namespace, settings: Settings) -> int:
    """Join runs into one network scored on validation (``train ensemble``)."""
    from dicomai.train.ensemble import make_ensemble

    try:
        summary = EnsembleSummary.of(make_ensemble(args.runs, _samples(args), args.out,
                                                   gradcam_from=args.gradcam_from))
    except ValueError as exc:
        raise DicomaiError(f"ensemble: {exc}") from None
    rows = [{"run": m.run, "backbone": m.backbone, "val_auroc": round(m.val_auroc, 4)}
            for m in summary.members]
    rows.append({"run": str(args.out), "backbone": "ensemble", "val_auroc": round(summary.best_val_auroc, 4)})
    print_table(rows, ["run", "backbone", "val_auroc"])
    print(f"{summary.val_images} validation images; release it with "
          f"`dicomai train release {args.out} {args.dataset} PACKAGE`")
    return ExitCode.OK


@_needs_extra
def cmd_train_combine(args: argparse.Namespace, settings: Settings) -> int:
    """Join released packages into one graph (``train combine``)."""
    from dicomai.model.package import load_package
    from dicomai.train.combine import combine_package

    paths = [p.resolve() for p in args.packages]
    if args.gradcam_from.resolve() not in paths:
        raise DicomaiError(f"combine: --gradcam-from {args.gradcam_from} is not one of the packages")
    packages = [load_package(p) for p in args.packages]
    try:
        pkg, report = combine_package(packages, _samples(args), args.out,
                                      args.name or packages[0].manifest.name, args.version,
                                      paths.index(args.gradcam_from.resolve()))
    except ValueError as exc:
        raise DicomaiError(f"combine: {exc}") from None
    ev = Evaluation.of(report["evaluation"])
    print(json.dumps({"package": str(pkg.directory), "check": report["check"],
                      "networks": len(pkg.manifest.training["members"]), "val_auroc": ev.val.auroc,
                      "val_pointing_game": ev.val.pointing_game}, indent=2))
    return ExitCode.OK


@_needs_extra
def cmd_train_release(args: argparse.Namespace, settings: Settings) -> int:
    """Export, check, evaluate and package a run (``train release``)."""
    from dicomai.train.release import release

    pkg, report = release(args.run, _samples(args), args.package, args.name, args.version,
                          weights=args.weights)
    ev = Evaluation.of(report["evaluation"])
    print(json.dumps({"package": str(pkg.directory), "test_auroc": ev.test.auroc,
                      "test_auroc_ci95": ev.test.auroc_ci95, "parity": report["parity"],
                      "operating_points": ev.operating_points}, indent=2))
    return ExitCode.OK


@_needs_extra
def cmd_train_stitch(args: argparse.Namespace, settings: Settings) -> int:
    """A finer Grad-CAM for a released package (``train stitch``)."""
    from dicomai.model.package import load_package
    from dicomai.train.stitch_release import stitch_package

    try:
        offsets = [(float(dy), float(dx)) for dy, dx in (o.split(",") for o in args.offsets.split())]
    except ValueError:
        raise DicomaiError(f"--offsets: expected 'DY,DX DY,DX ...', got {args.offsets!r}") from None
    try:
        sizes = [(int(z.split("x")[0]), int(z.split("x")[-1])) for z in args.sizes.split()]
    except ValueError:
        raise DicomaiError(f"--sizes: expected 'H HxW ...', got {args.sizes!r}") from None
    package = load_package(args.package)
    try:
        pkg, report = stitch_package(package, _samples(args), args.out, args.name or package.manifest.name,
                                     args.version, offsets, args.factor, args.sigma, sizes=sizes)
    except ValueError as exc:
        raise DicomaiError(f"stitch: {exc}") from None
    ev = Evaluation.of(report["evaluation"])
    print(json.dumps({"package": str(pkg.directory), "check": report["check"],
                      "grid": report["settings"]["grid"], "val_pointing_game": ev.val.pointing_game,
                      "val_auroc": ev.val.auroc, "test_auroc": ev.test.auroc}, indent=2))
    return ExitCode.OK


@_needs_extra
def cmd_train_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    """Figures of a package on a dataset (``train evaluate``)."""
    from dicomai.model.package import load_package
    from dicomai.train.evaluate import evaluate_package, refresh_package

    package = load_package(args.package)
    if args.update_package:
        _, result = refresh_package(package, _samples(args))
    else:
        result = evaluate_package(package, _samples(args), args.out)
    print(json.dumps(result, indent=2))
    return ExitCode.OK


@_needs_extra
def cmd_train_evaluate_robust(args: argparse.Namespace, settings: Settings) -> int:
    """A package on the test split, clean and degraded (``train evaluate-robust``)."""
    from dicomai.model.package import load_package
    from dicomai.train.robust import evaluate_robust, markdown_table

    if not 0.0 <= args.share <= 1.0:
        raise DicomaiError(f"--share {args.share}: a probability in [0, 1]")
    try:
        result = evaluate_robust(load_package(args.package), _samples(args), seed=args.seed, share=args.share,
                                 out_dir=args.out)
    except ValueError as exc:
        raise DicomaiError(f"evaluate-robust: {exc}") from None
    print(json.dumps(result, indent=2) if args.json else markdown_table(result))
    return ExitCode.OK


@_needs_extra
def cmd_train_explain(args: argparse.Namespace, settings: Settings) -> int:
    """Compare attribution methods on a run (``train explain``)."""
    from dicomai.train.attribution import METHODS, compare_methods
    from dicomai.train.nets import load_run

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = set(methods) - set(METHODS)
    if unknown or not methods:
        raise DicomaiError(f"unknown method(s) {sorted(unknown)}; known: {', '.join(METHODS)}")
    net, summary = load_run(args.run)
    size = int(summary["config"]["size"])
    out = args.out or args.run / "explain"  # beside the run it explains, not in the working directory
    result = compare_methods(net, size, _samples(args), out, images=args.images,
                             lime_samples=args.lime_samples, methods=methods)
    rows = [{"method": m, **{k: round(v, 3) for k, v in r.items()}} for m, r in result["methods"].items()]
    print_table(rows, ["method", "pointing_game", "pointing_game_15px", "energy_in_boxes",
                       "seconds_per_image"])
    print(f"{result['images']} fractured test images; boxes cover {result['box_area_share']:.3f} "
          f"of an image; {out / 'explain.json'}")
    return ExitCode.OK


@_needs_extra
def cmd_train_compare(args: argparse.Namespace, settings: Settings) -> int:
    """Released packages side by side (``train compare``; needs onnx only, no PyTorch)."""
    from dicomai.train.compare import compare_packages, markdown_table

    rows = compare_packages(args.packages, threads=args.threads)
    print(json.dumps(rows, indent=2) if args.json else markdown_table(rows, args.threads))
    return ExitCode.OK
