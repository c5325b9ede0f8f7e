"""Tests of the offline `dicomai classify` and `dicomai model` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from tests.helpers import SHARED_DICOM, missing, shared_file
from tests.synthetic import hot_spot_model


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomai", *args], capture_output=True, text=True,
                          timeout=300)


def test_classify_folder_files_and_jpeg(tmp_path: Path) -> None:
    """DICOM folders and PNG/JPEG files give one JSON line each; maps match the image geometry."""
    model = hot_spot_model(tmp_path / "model")
    if not SHARED_DICOM.exists():
        missing(f"shared test data {SHARED_DICOM}")
    png = tmp_path / "spot.png"
    img = np.full((90, 160), 20, np.uint8)
    img[50:90, 115:160] = 255
    Image.fromarray(img).save(png)
    out_dir = tmp_path / "maps"
    run = _run("classify", "--model", str(model), "--json", "--gradcam-dir", str(out_dir),
               str(SHARED_DICOM), str(png))
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    dicoms = sorted(p for p in SHARED_DICOM.glob("*.dcm"))
    assert len(lines) == len(dicoms) + 1  # LICENSE files in the folder are skipped
    for line in lines:
        assert {"path", "probability", "grade", "model", "seconds"} <= line.keys()
        assert line["model"] == "hot-spot-test 1.0.0"
    for line, path in zip(lines, dicoms, strict=False):
        ds = dcmread(path)
        assert line["sop_instance_uid"] == ds.SOPInstanceUID
        cam = np.load(out_dir / f"{path.stem}.gradcam.npy")
        assert cam.dtype == np.float32 and cam.shape == (ds.Rows, ds.Columns)
    spot = lines[-1]
    assert spot["grade"] == "positive" and "sop_instance_uid" not in spot
    cam = np.load(out_dir / "spot.gradcam.npy")
    y, x = np.unravel_index(np.argmax(cam), cam.shape)
    assert 45 <= y <= 90 and 110 <= x <= 160
    overlay = np.asarray(Image.open(out_dir / "spot.gradcam.png")).astype(int)
    assert overlay.shape == (90, 160, 3)
    grey = np.repeat(img[..., None], 3, axis=-1).astype(int)
    cold, hot = cam < 0.25, cam > 0.5  # 0.25: the default floor below which nothing is drawn
    assert (overlay[cold] == grey[cold]).all()
    assert np.abs(overlay[hot] - grey[hot]).mean() > 10


def test_classify_reports_failures_and_scope(tmp_path: Path) -> None:
    """A bad input gives an error line and exit 1; --scope marks out-of-scope images."""
    model = hot_spot_model(tmp_path / "model")
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all")
    nm = shared_file("JPEGExtended_1s_1f_u_16_12.dcm")
    run = _run("classify", "--model", str(model), "--json", "--scope", str(bad), str(nm))
    assert run.returncode == 1
    first, second = (json.loads(line) for line in run.stdout.splitlines())
    assert "error" in first and first["path"] == str(bad)
    assert second["grade"] == "not_analysed" and "SOP class" in second["reason"]


def test_model_info_and_verify(tmp_path: Path) -> None:
    """model info prints the manifest; model verify runs the graph; a bad hash fails verify."""
    model = hot_spot_model(tmp_path / "model")
    info = json.loads(_run("model", "info", str(model), "--json").stdout)
    assert info["name"] == "hot-spot-test" and info["operating_points"]["high_specificity"] == 0.7
    ok = _run("model", "verify", str(model))
    assert ok.returncode == 0 and "Grad-CAM 7x7" in ok.stdout
    with open(model / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    bad = _run("model", "verify", str(model))
    assert bad.returncode == 2 and "does not match" in bad.stderr


def test_classify_grades_each_body_part_by_the_site_profile(tmp_path: Path) -> None:
    """`dicomai classify` grades as the node does: a site profile's points for HAND apply to
    hand images, the site's overall points to the others (same image, same probability)."""
    from dicomai.model.package import load_package
    from dicomai.model.profile import PROFILE_NAME
    from tests.helpers import pydicom_data

    model = hot_spot_model(tmp_path / "model", thresholds=(0.3, 0.7))
    manifest = load_package(model).manifest
    data = tmp_path / "data"
    data.mkdir()
    (data / PROFILE_NAME).write_text(json.dumps({
        "model_name": manifest.name, "model_version": manifest.version,
        "model_sha256": manifest.sha256, "created_at": "2026-01-01T00:00:00Z", "by": "x",
        "cases": 500, "positives": 250, "targets": {"sensitivity": 0.9},
        "operating_points": {"high_sensitivity": 0.998, "high_specificity": 0.999},
        "body_parts": {"HAND": {"operating_points": {"high_sensitivity": 0.0, "high_specificity": 0.0},
                                "cases": 300, "positives": 150}}}))
    files = []
    for part in ("HAND", "FOOT"):
        ds = dcmread(pydicom_data("RG3_UNCR.dcm"))
        ds.BodyPartExamined = part
        files.append(tmp_path / f"{part}.dcm")
        ds.save_as(files[-1])
    run = _run("classify", "--model", str(model), "--data-dir", str(data), "--json", *map(str, files))
    assert run.returncode == 0, run.stderr
    hand, foot = (json.loads(line) for line in run.stdout.splitlines())
    assert hand["probability"] == foot["probability"] < 0.998
    assert (hand["grade"], foot["grade"]) == ("positive", "negative")
