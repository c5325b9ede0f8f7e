"""``dicomai classify``: the model on files, without a node or a database (see ``_classify``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dicomai.cli import Subparsers, json_flag
from dicomai.config import Settings

__all__ = ["cmd_classify", "register"]


def register(subparsers: Subparsers[argparse.ArgumentParser], common: argparse.ArgumentParser) -> None:
    """Add ``classify``."""
    classify = subparsers.add_parser("classify", parents=[common],
                                     help="classify DICOM, PNG or JPEG radiographs offline")
    classify.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="files or folders")
    classify.add_argument("--model", type=Path, metavar="DIR", help="model package (default: configured)")
    classify.add_argument("--gradcam-dir", type=Path, metavar="DIR",
                          help="write <name>.gradcam.png (overlay) and <name>.gradcam.npy per image")
    classify.add_argument("--scope", action="store_true", help="apply the node's scope rules")
    json_flag(classify)
    classify.set_defaults(func=cmd_classify)


def cmd_classify(args: argparse.Namespace, settings: Settings) -> int:
    """Classify the given files and folders; 1 if any input failed."""
    # Imported here: onnxruntime, PIL and pydicom would slow down every other command's start.
    from dicomai.cli._classify import classify_paths
    from dicomai.cli.model import model_dir

    return classify_paths(args.paths, settings, model_dir(settings, args.model),
                          as_json=args.json, gradcam_dir=args.gradcam_dir, scope=args.scope)
