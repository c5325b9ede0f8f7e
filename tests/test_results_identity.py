"""Tests that every result object keeps the source's patient and study, whole and consistent."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from highdicom import UID
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomai.model.grading import Grade
from dicomai.model.package import Manifest, load_package
from dicomai.results.gsps import presentation_state
from dicomai.results.kos import key_objects
from dicomai.results.sc import secondary_capture
from dicomai.results.sr import ImageFinding, structured_report
from tests.helpers import missing, shared_file
from tests.synthetic import hot_spot_model


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _rich_source(path: Path) -> Path:
    """The tiny DX with the identity attributes real archives key on (issuers, other IDs...)."""
    ds = dcmread(shared_file("dx_image.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.IssuerOfPatientID = "HOSP-A"
    qualifiers = Dataset()
    qualifiers.UniversalEntityID, qualifiers.UniversalEntityIDType = "1.2.3.4", "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID, other.TypeOfPatientID = "X-77", "HOSP-B", "TEXT"
    ds.OtherPatientIDsSequence = [other]
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS-A"
    ds.AccessionNumber = "ACC-1"
    ds.IssuerOfAccessionNumberSequence = [issuer]
    ds.StudyDescription = "Hand left, 2 views"
    ds.ProcedureCodeSequence = [_code("RPID1", "99LOCAL", "XR hand")]
    ds.PatientAge, ds.PatientWeight, ds.PatientSize = "042Y", 71.5, 1.78
    ds.AdditionalPatientHistory = "fall on outstretched hand"
    out = path / "source.dcm"
    ds.save_as(out)
    return out


def _results(tmp_path: Path, source: Path, manifest: Manifest) -> list[Path]:
    ds = dcmread(source)
    shown = np.zeros((ds.Rows, ds.Columns), dtype=np.float32)
    sc = secondary_capture(ds, shown, shown, Grade.POSITIVE, 0.9, manifest, UID())
    sr = structured_report([ImageFinding(ds, Grade.POSITIVE, 0.9, None, sc)], Grade.POSITIVE, 0.9,
                           manifest, (0.3, 0.7), UID(), identity=ds)
    gsps = presentation_state(ds, Grade.POSITIVE, 0.9, manifest, (1, 1, 8, 8), None, UID())
    kos = key_objects([ds], manifest, UID(), ds)
    paths = []
    for name, obj in (("sc", sc), ("sr", sr), ("gsps", gsps), ("kos", kos)):
        paths.append(tmp_path / f"{name}.dcm")
        obj.save_as(paths[-1])
    return paths


def test_results_carry_the_whole_identity(tmp_path: Path) -> None:
    """dcentvfy over the source and its SC, SR, GSPS and KOS finds no patient or study
    inconsistency, and
    each result has the source's issuers, other IDs, study description, age and weight."""
    tool = shutil.which("dcentvfy")
    if tool is None:
        missing("dcentvfy (apt-get install dicom3tools)")
    manifest = load_package(hot_spot_model(tmp_path / "m")).manifest
    source = _rich_source(tmp_path)
    results = _results(tmp_path, source, manifest)
    out = subprocess.run([str(tool), str(source), *map(str, results)], capture_output=True, text=True)
    # dicom3tools' SR tables place Accession Number in the Series IE ("Different information
    # entities"): a property of its tables, not of the instances, so not a complaint here.
    complaints = [line for line in (out.stdout + out.stderr).splitlines()
                  if ("Error" in line or "Warning" in line) and "Different information entities" not in line]
    assert complaints == []
    src = dcmread(source)
    for path in results:
        ds = dcmread(path)
        for keyword in ("PatientName", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
                        "OtherPatientIDsSequence", "IssuerOfAccessionNumberSequence", "StudyDescription",
                        "ProcedureCodeSequence", "PatientAge", "PatientWeight", "PatientSize",
                        "AdditionalPatientHistory", "SpecificCharacterSet"):
            assert ds[keyword].value == src[keyword].value, (path.name, keyword)


@pytest.mark.parametrize("absent", [
    ("PatientBirthDate", "PatientSex", "StudyID", "ReferringPhysicianName", "AccessionNumber"),
    ("PatientName", "PatientID", "StudyDate", "StudyTime"),
])
def test_results_tolerate_absent_type2_attributes(tmp_path: Path, absent: tuple[str, ...]) -> None:
    """A source lacking Type 2 patient and study attributes still gets its SC and SR, with the
    attributes present and empty."""
    manifest = load_package(hot_spot_model(tmp_path / "m")).manifest
    ds = dcmread(shared_file("dx_image.dcm"))
    for keyword in absent:
        if keyword in ds:
            del ds[keyword]
    source = tmp_path / "bare.dcm"
    ds.save_as(source)
    for path in _results(tmp_path, source, manifest):
        back = dcmread(path)
        for keyword in absent:
            assert keyword in back and not back[keyword].value, (path.name, keyword)


def test_results_tolerate_malformed_values(tmp_path: Path) -> None:
    """Undecodable patient and study values (a date that is no date, a bad age) are left out
    or empty rather than stopping the SC and SR."""
    manifest = load_package(hot_spot_model(tmp_path / "m")).manifest
    source = tmp_path / "odd.dcm"
    ds = dcmread(shared_file("dx_image.dcm"))
    ds.save_as(source)
    raw = source.read_bytes()
    birth = ds.get("PatientBirthDate", "")
    assert birth and len(str(birth)) == 8
    source.write_bytes(raw.replace(str(birth).encode(), b"19xx0101", 1))
    for path in _results(tmp_path, source, manifest):
        back = dcmread(path)
        assert "PatientBirthDate" in back and not back.PatientBirthDate
