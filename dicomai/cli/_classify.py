"""``dicomai classify``: the model on files, without a node or a database.

Takes DICOM files, folders (searched recursively for DICOM, PNG and JPEG files) and plain
PNG/JPEG radiographs. Prints one line per image (JSON with ``--json``): path, SOP Instance
UID (DICOM), probability, grade, model and seconds, or the error. With ``--gradcam-dir`` it
writes, per image, the overlay as PNG and the raw map as ``.npy`` (float32, original image
geometry). Exits 1 if any input failed.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicomai.analysis.image import operating_points
from dicomai.analysis.scope import out_of_scope
from dicomai.config import Settings
from dicomai.imaging.gradcam import gradcam_on_image
from dicomai.imaging.overlay import overlay
from dicomai.imaging.pixels import NormalizeError, to_display
from dicomai.model.classifier import Classifier, preprocess
from dicomai.model.grading import Grade, grade_image
from dicomai.model.package import load_package

__all__ = ["classify_paths", "iter_inputs"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def iter_inputs(paths: list[Path]) -> Iterator[Path]:
    """Files as given; folders searched recursively for DICOM and PNG/JPEG files, sorted."""
    for path in paths:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file()):
                if child.suffix.lower() in IMAGE_SUFFIXES or _is_dicom(child):
                    yield child
        else:
            yield path


class _Progress:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.enabled = sys.stderr.isatty() and total > 1

    def step(self, done: int) -> None:
        if self.enabled:
            width = 30
            filled = int(width * done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def classify_paths(paths: list[Path], settings: Settings, model_dir: Path, as_json: bool = False,
                   gradcam_dir: Path | None = None, scope: bool = False) -> int:
    """Classify every image under ``paths``; returns the exit code (1 if any failed)."""
    package = load_package(model_dir)
    classifier = Classifier(package, settings.model.threads, settings.model.providers)
    points = operating_points(settings, package)
    model_label = f"{package.manifest.name} {package.manifest.version}"
    if gradcam_dir is not None:
        gradcam_dir.mkdir(parents=True, exist_ok=True)
    inputs = list(iter_inputs(paths))
    progress = _Progress(len(inputs))
    failures, used_names = 0, set[str]()
    for n, path in enumerate(inputs, start=1):
        started = time.perf_counter()
        record: dict[str, Any] = {"path": str(path)}
        try:
            image = _load(path, record, settings, package.manifest.body_parts, scope)
            if image is not None:
                model_input = preprocess(image, package)
                (out,) = classifier.predict([model_input])
                record.update(probability=round(out.probability, 6),
                              grade=str(grade_image(out.probability, points)), model=model_label)
                if gradcam_dir is not None:
                    cam = (gradcam_on_image(out.gradcam, model_input.geometry)
                           if out.gradcam is not None else None)
                    name = path.stem if path.stem not in used_names else f"{path.stem}-{n}"
                    used_names.add(name)
                    Image.fromarray(overlay(image, cam)).save(gradcam_dir / f"{name}.gradcam.png")
                    if cam is not None:
                        np.save(gradcam_dir / f"{name}.gradcam.npy", cam.astype(np.float32))
                    record["gradcam"] = cam is not None
        except (NormalizeError, InvalidDicomError, UnidentifiedImageError, OSError, ValueError,
                AttributeError) as exc:
            record["error"] = str(exc) or type(exc).__name__
            failures += 1
        record["seconds"] = round(time.perf_counter() - started, 4)
        progress.step(n)
        _emit(record, as_json, progress.enabled)
    progress.close()
    return 1 if failures else 0


def _load(path: Path, record: dict[str, Any], settings: Settings, body_parts: list[str],
          scope: bool) -> np.ndarray | None:
    """The display image, or ``None`` when ``--scope`` rules it out (recorded in ``record``)."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        with Image.open(path) as im:
            return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    ds = dcmread(path)
    record["sop_instance_uid"] = str(ds.get("SOPInstanceUID", "")) or None
    if scope:
        reason = out_of_scope(ds, settings.scope, body_parts)
        if reason is not None:
            record.update(grade=str(Grade.NOT_ANALYSED), reason=reason)
            return None
    return to_display(ds).image


def _emit(record: dict[str, Any], as_json: bool, clear_line: bool) -> None:
    if clear_line:
        sys.stderr.write("\r\033[K")
    if as_json:
        print(json.dumps(record), flush=True)
    elif "error" in record:
        print(f"{record['path']}: ERROR {record['error']}", flush=True)
    elif "probability" in record:
        print(f"{record['path']}: {record['grade']} p={record['probability']:.3f} "
              f"({record['seconds']:.2f}s)", flush=True)
    else:
        print(f"{record['path']}: {record['grade']} ({record.get('reason')})", flush=True)
