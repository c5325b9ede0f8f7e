"""Datasets: the FracAtlas layout, prepared with the node's own preprocessing."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from dicomai.normalize import Letterbox, letterbox

__all__ = ["Sample", "load_fracatlas", "prepare"]


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


def load_display(path: Path) -> NDArray[np.float32]:
    """A radiograph file as the node's display image (8-bit grey / 255)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def prepare(samples: list[Sample], size: int) -> tuple[NDArray[np.uint8], list[Letterbox]]:
    """Letterboxed images (uint8, N x size x size) exactly as the node feeds the model."""
    out = np.zeros((len(samples), size, size), np.uint8)
    geoms = []
    for i, s in enumerate(samples):
        boxed, geom = letterbox(load_display(s.path), size, size)
        out[i] = np.round(boxed * 255).astype(np.uint8)
        geoms.append(geom)
    return out, geoms
