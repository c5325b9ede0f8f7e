"""Datasets in four layouts, all prepared with the node's own preprocessing.

* ``fracatlas``: ``labels.csv`` (image_id, fractured, split, region), ``boxes.csv``, ``images/``.
* ``folders``: one folder per class, optionally under split folders, as the Fracture
  Multi-Region X-ray dataset ships (``train/fractured``, ``val/not fractured``, ...). Without
  split folders, images are split 70/15/15 by a hash of their folder, so that images of one
  patient folder stay together.
* ``mura``: the MURA-v1.1 CSVs (``train_image_paths.csv``, ``valid_image_paths.csv``); the label
  is the study's (``study1_positive``); MURA's ``valid`` is the test split and 15 % of the
  training *patients* (not images) become the validation split.
* ``dicom``: a folder of DICOM files and a labels CSV (``path``, ``label``; optional ``split``,
  ``patient_id``, ``region``). Pixels go through the node's decode and display pipeline, so
  training and serving see identical images.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from dicomai.imaging.pixels import Letterbox, letterbox

__all__ = ["LAYOUTS", "DatasetError", "Sample", "load_dataset", "load_dicom_folder", "load_fracatlas",
           "load_folders", "load_mura", "prepare"]

LAYOUTS = ("auto", "fracatlas", "folders", "mura", "dicom")
_POSITIVE = {"fractured", "fracture", "fractures", "positive", "abnormal", "1", "yes", "true"}
_NEGATIVE = {"not fractured", "not_fractured", "notfractured", "non-fractured", "non_fractured",
             "nonfractured", "normal", "negative", "0", "no", "false"}
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
           "test": "test", "testing": "test"}
_IMAGES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


class DatasetError(ValueError):
    """The folder is not in the layout asked for, or a label cannot be read."""


def _label(value: str) -> int | None:
    v = value.strip().lower()
    return 1 if v in _POSITIVE else 0 if v in _NEGATIVE else None


def _hash_split(key: str, val: float = 0.15, test: float = 0.15) -> str:
    """A stable split from a grouping key (patient, folder): same key, same split."""
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if u < test else "val" if u < test + val else "train"


@dataclass(frozen=True)
class Sample:
    image_id: str
    path: Path
    label: int
    split: str
    region: str
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # x, y, w, h


def load_fracatlas(root: Path) -> list[Sample]:
    """``labels.csv`` (with its split) and ``boxes.csv`` of a FracAtlas folder."""
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    with open(root / "boxes.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            boxes.setdefault(row["image_id"], []).append(
                (float(row["x"]), float(row["y"]), float(row["w"]), float(row["h"])))
    samples = []
    with open(root / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            samples.append(Sample(row["image_id"], root / "images" / row["image_id"],
                                  int(row["fractured"]), row["split"], row["region"],
                                  boxes.get(row["image_id"], [])))
    return samples


def load_folders(root: Path) -> list[Sample]:
    """Class-per-folder layout; see the module docstring."""
    samples = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGES | {".dcm"}):
        parts = path.relative_to(root).parts[:-1]
        labels = [lab for lab in (_label(part) for part in parts) if lab is not None]
        if not labels:
            continue
        splits = [_SPLITS[part.lower()] for part in parts if part.lower() in _SPLITS]
        group = str(path.parent.relative_to(root))
        samples.append(Sample(str(path.relative_to(root)), path, labels[-1],
                              splits[0] if splits else _hash_split(group), region=""))
    if not samples:
        raise DatasetError(f"{root}: no image under a class folder ({', '.join(sorted(_POSITIVE))} / "
                           f"{', '.join(sorted(_NEGATIVE))})")
    return samples


def load_mura(root: Path) -> list[Sample]:
    """MURA-v1.1 layout; see the module docstring."""
    samples = []
    for csv_name, mura_split in (("train_image_paths.csv", "train"), ("valid_image_paths.csv", "valid")):
        listing = root / csv_name
        if not listing.is_file():
            raise DatasetError(f"{root}: no {csv_name} (not a MURA-v1.1 folder)")
        for line in listing.read_text().splitlines():
            rel = line.strip().strip(",")
            if not rel:
                continue
            parts = Path(rel).parts
            # Paths in the CSV start with the dataset folder's own name (MURA-v1.1/train/...).
            path = root.joinpath(*parts[1:]) if parts[0] == root.name else root / rel
            study = next((p for p in parts if p.startswith("study")), "")
            patient = next((p for p in parts if p.startswith("patient")), rel)
            if not study.endswith(("_positive", "_negative")):
                raise DatasetError(f"{rel}: no study label (study..._positive/_negative) in the path")
            region = next((p[3:].lower() for p in parts if p.startswith("XR_")), "")
            split = "test" if mura_split == "valid" else ("val" if _hash_split(patient, 0.15, 0.0) == "val"
                                                          else "train")
            samples.append(Sample(rel, path, int(study.endswith("_positive")), split, region))
    return samples


def load_dicom_folder(root: Path, labels: Path) -> list[Sample]:
    """DICOM files and a labels CSV; see the module docstring."""
    samples = []
    with open(labels, newline="") as fh:
        for n, row in enumerate(csv.DictReader(fh), start=2):
            if "path" not in row or "label" not in row:
                raise DatasetError(f"{labels}: needs the columns path and label")
            label = _label(row["label"])
            if label is None:
                raise DatasetError(f"{labels}:{n}: label {row['label']!r} is neither positive nor negative")
            split = _SPLITS.get((row.get("split") or "").strip().lower())
            split = split or _hash_split(row.get("patient_id") or row["path"])
            samples.append(Sample(row["path"], root / row["path"], label, split, row.get("region") or ""))
    return samples


def load_dataset(root: Path, layout: str = "auto", labels: Path | None = None) -> list[Sample]:
    """Samples of a dataset in any supported layout (``auto``: guessed from the files)."""
    if layout not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r} (one of {', '.join(LAYOUTS)})")
    if layout == "auto":
        if labels is not None:
            layout = "dicom"
        elif (root / "labels.csv").is_file() and (root / "boxes.csv").is_file():
            layout = "fracatlas"
        elif (root / "train_image_paths.csv").is_file():
            layout = "mura"
        else:
            layout = "folders"
    if layout == "fracatlas":
        return load_fracatlas(root)
    if layout == "mura":
        return load_mura(root)
    if layout == "dicom":
        if labels is None:
            raise DatasetError("the dicom layout needs a labels CSV (--labels)")
        return load_dicom_folder(root, labels)
    return load_folders(root)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    with open(path, "rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def load_display(path: Path) -> NDArray[np.float32]:
    """A radiograph file as the node's display image: DICOM through the node's own decoding,
    LUTs and windowing; PNG/JPEG as 8-bit grey / 255."""
    if _is_dicom(path):
        from pydicom import dcmread

        from dicomai.imaging.pixels import decode, to_display

        ds = dcmread(path)
        return to_display(ds, decode(ds)).image
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def prepare(samples: list[Sample], size: int, exact: bool = False,
            ) -> tuple[NDArray[np.uint8] | NDArray[np.float32], list[Letterbox]]:
    """Letterboxed images (N x size x size) through the node's own preprocessing.

    By default stored as uint8 (a quarter of the memory, for the training images, which are
    augmented anyway); with ``exact`` as the float32 values in [0, 1] that the node feeds the
    model, so that model selection on validation sees the node's pixels, not a rounding of them.
    """
    out = np.zeros((len(samples), size, size), np.float32 if exact else np.uint8)
    geoms = []
    for i, s in enumerate(samples):
        boxed, geom = letterbox(load_display(s.path), size, size)
        out[i] = boxed if exact else np.round(boxed * 255)
        geoms.append(geom)
    return out, geoms
