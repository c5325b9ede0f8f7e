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

from dicomai.analysis.image import Analyser, ImageAnalysis, short_reason
from dicomai.config import Settings
from dicomai.imaging.overlay import overlay
from dicomai.model.classifier import Classifier
from dicomai.model.grading import Grade
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
    """Classify every image under ``paths``; returns the exit code (1 if any failed).

    The images go through the node's own per-image path (:class:`~dicomai.analysis.image.Analyser`).
    """
    package = load_package(model_dir)
    classifier = Classifier(package, settings.model.threads, settings.model.providers)
    analyser = Analyser.in_force(settings, package, classifier)
    model_label = f"{package.manifest.name} {package.manifest.version}"
    if gradcam_dir is not None:
        gradcam_dir.mkdir(parents=True, exist_ok=True)
    inputs = list(iter_inputs(paths))
    progress = _Progress(len(inputs))
    failures, used_names = 0, set[str]()
    for n, path in enumerate(inputs, start=1):
        started = time.perf_counter()
        record: dict[str, Any] = {"path": str(path)}
        result = _analyse(analyser, path, record, scope)
        if result.grade == Grade.FAILED:
            record["error"] = result.reason or "failed"
            failures += 1
        elif result.grade == Grade.NOT_ANALYSED:
            record.update(grade=str(result.grade), reason=result.reason)
        else:
            assert result.probability is not None and result.display is not None
            record.update(probability=round(result.probability, 6), grade=str(result.grade),
                          model=model_label)
            if gradcam_dir is not None:
                cam = result.gradcam.on_image() if result.gradcam is not None else None
                name = path.stem if path.stem not in used_names else f"{path.stem}-{n}"
                used_names.add(name)
                Image.fromarray(overlay(result.display, cam)).save(gradcam_dir / f"{name}.gradcam.png")
                if cam is not None:
                    np.save(gradcam_dir / f"{name}.gradcam.npy", cam.astype(np.float32))
                record["gradcam"] = cam is not None
        record["seconds"] = round(time.perf_counter() - started, 4)
        progress.step(n)
        _emit(record, as_json, progress.enabled)
    progress.close()
    return 1 if failures else 0


def _analyse(analyser: Analyser, path: Path, record: dict[str, Any], scope: bool) -> ImageAnalysis:
    """One file through the analyser: a PNG/JPEG radiograph as displayed, or a DICOM file."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        try:
            with Image.open(path) as im:
                display = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError) as exc:
            return ImageAnalysis(Grade.FAILED, reason=short_reason("cannot read the image", exc))
        return analyser.analyse_display(display)
    source = analyser.read(path)
    if not isinstance(source, str):
        record["sop_instance_uid"] = str(source.get("SOPInstanceUID", "")) or None
    return analyser.analyse([source], apply_scope=scope)[0]


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
