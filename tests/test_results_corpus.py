"""Tests that every real radiograph at hand gets a valid SC and SR, whatever its header holds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from highdicom import UID
from pydicom import dcmread
from pydicom.data.data_manager import DATA_ROOT, external_data_sources
from pydicom.dataset import Dataset

from dicomai.model.grading import Grade
from dicomai.model.package import load_package
from dicomai.results.sc import secondary_capture
from dicomai.results.sr import ImageFinding, structured_report
from tests.helpers import TEST_DATA, missing
from tests.synthetic import hot_spot_model


def _folders() -> list[Path]:
    """pydicom's own test files, pydicom-data's store (read locally: get_testdata_files would
    try to download what the store lacks) and the shared data."""
    found = [Path(DATA_ROOT) / "test_files", TEST_DATA / "dicom", TEST_DATA / "oddballs"]
    found += [Path(p) for p in (getattr(s, "data_path", None) for s in external_data_sources().values()) if p]
    return [f for f in found if f.is_dir()]


def _radiographs() -> list[Path]:
    out = []
    for folder in _folders():
        for path in sorted(folder.rglob("*")):
            if not path.is_file() or path.suffix in {".py", ".txt", ".json", ".md"}:
                continue
            try:
                ds = dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 -- not DICOM, or not readable: not in the corpus
                continue
            if ds.get("Modality") in ("CR", "DX") and "Rows" in ds:
                out.append(path)
    return out


RADIOGRAPHS = _radiographs()


def _errors(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        missing("dciodvfy (apt-get install dicom3tools)")
    out = subprocess.run([str(tool), str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_the_corpus_holds_real_radiographs() -> None:
    """The corpus is not empty: pydicom-data's and the shared CRs and DXs are found."""
    names = {p.name for p in RADIOGRAPHS}
    if not {"RG3_UNCR.dcm", "dx_image.dcm"} <= names:
        missing(f"pydicom-data and the shared test data (found {sorted(names)})")


@pytest.mark.parametrize("source", RADIOGRAPHS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_radiograph_gets_a_valid_sc_and_sr(tmp_path: Path, source: Path) -> None:
    """SC and SR are made from the real header (pixels stand in) and dciodvfy finds no error."""
    manifest = load_package(hot_spot_model(tmp_path / "m")).manifest
    ds: Dataset = dcmread(source, stop_before_pixels=True)
    shown = np.zeros((int(ds.Rows), int(ds.Columns)), dtype=np.float32)
    sc = secondary_capture(ds, shown, shown, Grade.NEGATIVE, 0.1, manifest, UID(), max_side=256)
    sr = structured_report([ImageFinding(ds, Grade.NEGATIVE, 0.1, None, sc)], Grade.NEGATIVE, 0.1,
                           manifest, (0.3, 0.7), UID(), identity=ds)
    for name, obj in (("sc", sc), ("sr", sr)):
        path = tmp_path / f"{name}.dcm"
        obj.save_as(path)
        assert _errors(path) == [], name
        assert dcmread(path).PatientID == ds.get("PatientID", "")
