"""Tests of the Secondary Capture result object: DICOM validity, content and rendering."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from highdicom import UID
from PIL import Image
from pydicom import dcmread

from dicomai.config import ScStyle
from dicomai.imaging.pixels import to_display
from dicomai.model.grading import Grade
from dicomai.model.package import load_package
from dicomai.results.sc import BOX_COLOUR, SC_SERIES_DESCRIPTION, secondary_capture
from tests.helpers import dcmtk, missing, pydicom_data, shared_file
from tests.synthetic import hot_spot_model


def _dciodvfy(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        missing("dciodvfy (apt-get install dicom3tools)")
    out = subprocess.run([str(tool), str(path)], capture_output=True, text=True)
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith(("Error", "Warning"))]
    # An empty Laterality is the truthful value for a paired body part whose source does not
    # say (Type 2C); dciodvfy warns about every empty one.
    ds = dcmread(path, stop_before_pixels=True)
    if not ds.get("Laterality", "?"):
        lines = [line for line in lines if not line.endswith(_EMPTY_LATERALITY)]
    # Body Part Examined is the source's, a defined term of PS3.16 Annex L (TIBIA, THORAX) that
    # dicom3tools' tables lack: the source itself gets the same warning.
    unknown = f"Unrecognized defined term <{ds.get('BodyPartExamined', '')}> for value 1 of attribute "
    return [line for line in lines if line != f"Warning - {unknown}<Body Part Examined>"]


_EMPTY_LATERALITY = ("is only permitted to be empty when actually unknown; should be absent (not empty) "
                     "if an unpaired body part, and have a value if a paired body part - attribute "
                     "<Laterality>")


def _make(tmp_path: Path, source: Path, max_side: int = 2048, **options: Any) -> tuple[Path, np.ndarray]:
    pkg = load_package(hot_spot_model(tmp_path / "m"))
    ds = dcmread(source)
    shown = to_display(ds).image
    cam = np.zeros_like(shown)
    h, w = shown.shape
    cam[h // 3: h // 2, w // 3: w // 2] = 1.0
    sc = secondary_capture(ds, shown, cam, Grade.POSITIVE, 0.93, pkg.manifest, UID(), max_side=max_side,
                           **options)
    path = tmp_path / f"sc-{len(list(tmp_path.glob('sc-*.dcm')))}.dcm"
    sc.save_as(path)
    return path, cam


@pytest.mark.parametrize("source", ["RG3_UNCR.dcm", "RG2_JPLL.dcm", "dx_image.dcm"])
def test_sc_is_valid_dicom(tmp_path: Path, source: str) -> None:
    """dciodvfy reports no error; the SC belongs to the source's patient and study."""
    src = pydicom_data(source) if source.startswith("RG3") else shared_file(source)
    path, _ = _make(tmp_path, src)
    assert _dciodvfy(path) == []
    sc, orig = dcmread(path), dcmread(src, stop_before_pixels=True)
    assert (sc.StudyInstanceUID, sc.PatientID) == (orig.StudyInstanceUID, orig.PatientID)
    assert sc.SeriesInstanceUID != orig.SeriesInstanceUID
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert (sc.ConversionType, sc.BurnedInAnnotation) == ("WSD", "YES")
    assert sc.SeriesDescription == SC_SERIES_DESCRIPTION and sc.Manufacturer == "dicomai"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == orig.SOPInstanceUID
    assert any("hot-spot-test" in v for v in sc.SoftwareVersions)
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BitsAllocated) == ("RGB", 3, 8)
    assert max(sc.Rows, sc.Columns) <= 2048 + 200  # image downscaled; caption band below it
    # the series says what it shows and when it was made
    assert sc.get("BodyPartExamined") == orig.get("BodyPartExamined") and sc.SeriesDate and sc.SeriesTime


def test_sc_renders_with_caption_and_heat_map(tmp_path: Path) -> None:
    """dcmj2pnm renders the heat-map style SC; the caption band has text and the hot region
    is coloured."""
    src = pydicom_data("RG3_UNCR.dcm")
    path, cam = _make(tmp_path, src, max_side=1024, style=ScStyle.HEATMAP)
    png = tmp_path / "sc.png"
    subprocess.run([dcmtk("dcmj2pnm"), "+on", str(path), str(png)], check=True, capture_output=True)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    h = 1024  # the 1760x1760 source downscaled to 1024
    assert img.shape[1] == 1024 and img.shape[0] > h
    band = img[h:]
    assert (band.max(axis=2) < 40).mean() > 0.7  # mostly black
    assert (band.min(axis=2) > 200).sum() > 500  # white text pixels
    hot = img[int(h * 0.4), int(1024 * 0.42)]
    assert hot[0] - hot[2] > 60  # red over the hot region
    cold = img[int(h * 0.9), int(1024 * 0.1)]
    assert abs(cold[0] - cold[1]) <= 2 and abs(cold[1] - cold[2]) <= 2  # grey elsewhere


def test_sc_outline_keeps_the_bone_visible_and_is_stored_losslessly(tmp_path: Path) -> None:
    """The default SC frames the hotspot instead of covering it: rendered by dcmtk, the pixels
    inside the box are the radiograph's grey, the frame just outside it is yellow, the caption
    is under the image (not in the top corners). Stored JPEG-LS lossless, it decodes to exactly
    the uncompressed SC's pixels and passes dciodvfy."""
    src = pydicom_data("RG3_UNCR.dcm")
    path, _ = _make(tmp_path, src, max_side=1024, compress=True)
    plain, _ = _make(tmp_path, src, max_side=1024)
    assert _dciodvfy(path) == []
    sc = dcmread(path)
    assert sc.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert np.array_equal(sc.pixel_array, dcmread(plain).pixel_array)
    assert path.stat().st_size < plain.stat().st_size / 2
    png = tmp_path / "sc.png"
    subprocess.run([dcmtk("dcml2pnm"), "+on", str(path), str(png)], check=True, capture_output=True)
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    h = w = 1024
    ys, xs = np.nonzero((img[:h] == BOX_COLOUR).all(axis=2))  # the yellow frame
    expected = (w // 3, h // 3, w // 2, h // 2)  # the map's hot square, scaled
    assert max(abs(a - b) for a, b in zip((xs.min(), ys.min(), xs.max(), ys.max()), expected,
                                          strict=True)) <= 8
    c0, r0, c1, r1 = xs.min() + 3, ys.min() + 3, xs.max() - 3, ys.max() - 3  # inside the frame
    inside = img[r0 + 3:r1 - 2, c0 + 3:c1 - 2]
    grey = (np.ptp(inside, axis=2) <= 2).mean()
    assert grey > 0.97, grey  # bone visible: grey, not red
    assert inside.std() > 3  # and not a flat fill
    shown = np.round(to_display(dcmread(src)).image * 255)
    y, x = (r0 + r1) // 2, (c0 + c1) // 2
    assert abs(img[y, x, 0] - shown[y * 1760 // 1024, x * 1760 // 1024]) < 30
    assert (np.ptp(img[:h], axis=2) > 2).mean() < 0.05  # the rest of the image stays grey
    assert (img[h:].max(axis=2) < 40).mean() > 0.7 and img.shape[0] > h  # caption band below


def _study(tmp_path: Path) -> tuple[list, object]:
    from dicomai.results.sr import ImageFinding

    pkg = load_package(hot_spot_model(tmp_path / "m"))
    a = dcmread(pydicom_data("RG3_UNCR.dcm"))
    b = dcmread(shared_file("RG2_JPLL.dcm"))
    c = dcmread(pydicom_data("RG1_UNCR.dcm"))
    d = dcmread(shared_file("dx_image.dcm"))
    for other in (b, c, d):  # one study
        other.StudyInstanceUID, other.PatientID = a.StudyInstanceUID, a.PatientID
        other.PatientName = a.PatientName
    a.BodyPartExamined, a.Laterality = "TIBIA", "R"  # RG3 is a right tibia tagged EXTREMITY
    shown = to_display(a).image
    sc = secondary_capture(a, shown, np.zeros_like(shown), Grade.POSITIVE, 0.93, pkg.manifest, UID())
    findings = [ImageFinding(a, Grade.POSITIVE, 0.93, None, sc, region=(600, 500, 900, 800)),
                ImageFinding(b, Grade.DOUBTFUL, 0.41),
                ImageFinding(c, Grade.NOT_ANALYSED, None, "body part not analysed: CHEST"),
                ImageFinding(d, Grade.FAILED, None, "cannot decode the image: ValueError: bad JPEG stream")]
    return findings, pkg


def _pixelmed(path: Path) -> list[str]:
    """PixelMed's SR validator's warnings and errors (its XPath needs the JDK's limits lifted)."""
    jar = Path("/usr/share/java/pixelmed.jar")
    if not jar.exists() or shutil.which("java") is None:
        missing("PixelMed's validator (apt-get install libpixelmed-java)")
    out = subprocess.run(["java", "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                          "-Djdk.xml.xpathTotalOpLimit=0", "-cp", str(jar),
                          "com.pixelmed.validate.DicomSRValidator", str(path)],
                         capture_output=True, text=True, timeout=300)
    lines = (out.stdout + out.stderr).splitlines()
    assert "Found Root Template TID_1500 (MeasurementReport)" in lines, lines[:20]
    return [line for line in lines if line.startswith(("Warning", "Error"))]


def test_sr_content_validity_and_references(tmp_path: Path) -> None:
    """The SR passes dciodvfy, dsrdump and PixelMed's TID 1500 check, and highdicom reads back
    each image's finding, probability, region, finding site and source image, the study's result and the
    not-analysed and failed images as such, with a short reason."""
    import highdicom.sr as hsr
    from highdicom.sr.utils import find_content_items
    from pydicom.sr.codedict import codes

    from dicomai.results.sr import FRACTURE, structured_report

    findings, pkg = _study(tmp_path)
    sr = structured_report(findings, Grade.POSITIVE, 0.93, pkg.manifest, (0.3, 0.7), UID(),
                           identity=findings[0].source)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert _dciodvfy(path) == []
    back = dcmread(path)
    # in the words of the coded finding, as the SC's caption and the GSPS's text
    assert back.SeriesDescription == "AI fracture: POSITIVE (fracture present)" and back.InstanceNumber == 1
    assert (back.VerificationFlag, back.CompletionFlag) == ("UNVERIFIED", "COMPLETE")
    assert back.StudyInstanceUID == findings[0].source.StudyInstanceUID
    report = hsr.srread(path).content  # parsed back into a MeasurementReport
    assert isinstance(report, hsr.MeasurementReport)
    groups = {g.tracking_identifier: g for g in report.get_image_measurement_groups()}
    assert set(groups) == {"image 1", "image 2", "image 3", "image 4"}  # the study is no image group
    probability = hsr.CodedConcept("122157", "DCM", "Probability")
    for name, value, p in (("image 1", codes.SCT.Present, 0.93), ("image 2", codes.SCT.Indeterminate, 0.41)):
        (ev,) = groups[name].get_qualitative_evaluations(name=FRACTURE)
        assert ev.value == value and groups[name].get_measurements(name=probability)[0].value == p
    (region,) = find_content_items(groups["image 1"][0], name=codes.DCM.SourceOfMeasurement,
                                   value_type=hsr.ValueTypeValues.SCOORD)
    assert region.value.tolist()[0] == [600, 500] and region.value.tolist()[2] == [900, 800]
    assert (region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            == findings[0].source.SOPInstanceUID)
    for n, name in enumerate(sorted(groups)):  # found by today's and older highdicom
        refs = {r.referenced_sop_instance_uid for r in groups[name].source_images}
        assert refs == {findings[n].source.SOPInstanceUID}
        source = hsr.CodedConcept("260753009", "SCT", "Source")
        assert len(find_content_items(groups[name][0], name=source)) == 1
    for name in ("image 3", "image 4"):
        assert groups[name].get_qualitative_evaluations(name=FRACTURE) == []
    # where each analysed image is: its body part and side, coded (TID 1501 rows 6-7)
    (site,) = groups["image 1"].finding_sites
    assert site.value == codes.SCT.Tibia and site.laterality == codes.SCT.Right
    (site,) = groups["image 2"].finding_sites  # RG2: a hip, no side in its header
    assert site.value == codes.SCT.HipJoint and site.laterality is None
    assert groups["image 3"].finding_sites == []  # not analysed: no site
    dump = subprocess.run([dcmtk("dsrdump"), "+Pc", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    assert 'CONTAINER:(C0034375,UMLS,"Qualitative Evaluations")' in dump.stdout
    assert dump.stdout.count('(262008008,SCT,"Not performed")') == 2
    assert '"body part not analysed: CHEST"' in dump.stdout
    assert '"cannot decode the image"' in dump.stdout and "ValueError" not in dump.stdout
    assert '(121200,DCM,"Illustration of ROI")' in dump.stdout
    assert "hot-spot-test" in dump.stdout and "sha256=" in dump.stdout
    assert dump.stdout.count('(111001,DCM,"Algorithm Name")') == 4  # once per group
    # PixelMed's 2022 tables lack TID 1501/1410's qualitative-evaluation rows and the
    # "Not performed" reason rows (TID 1501 is extensible): those, and nothing else.
    extensions = ('/CODE (125605004,SCT,"Fracture of bone"): Content Item not in template',
                  '/CODE (111004,DCM,"Analysis Performed"): Content Item not in template',
                  '/TEXT (121106,DCM,"Comment"): Content Item not in template')
    assert [w for w in _pixelmed(path) if not w.endswith(extensions)] == []


def test_sr_supersedes_previous(tmp_path: Path) -> None:
    """A re-run's SR lists the SR it replaces, says it is a revision (next instance number,
    "(revised)") and keeps the tracking and device observer UIDs, so findings can be followed."""
    from highdicom.sr.utils import find_content_items
    from pydicom.sr.codedict import codes

    from dicomai.results.sr import SR_REVISED, structured_report

    findings, pkg = _study(tmp_path)
    first = structured_report(findings[:1], Grade.POSITIVE, 0.93, pkg.manifest, (0.3, 0.7), UID(),
                              identity=findings[0].source)
    second = structured_report(findings, Grade.POSITIVE, 0.93, pkg.manifest, (0.3, 0.7), UID(),
                               identity=findings[0].source, previous=first)
    pred = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert pred.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert (first.InstanceNumber, second.InstanceNumber) == (1, 2)
    assert SR_REVISED not in first.SeriesDescription and SR_REVISED in second.SeriesDescription

    def uids(sr: object, name: object) -> list[str]:
        return [i.UID for i in find_content_items(sr, name=name,  # type: ignore[arg-type]
                                                  recursive=True)]

    for name in (codes.DCM.TrackingUniqueIdentifier, codes.DCM.DeviceObserverUID):
        assert uids(second, name)[:1] == uids(first, name)[:1] != [], name
    path = tmp_path / "sr2.dcm"
    second.save_as(path)
    assert _dciodvfy(path) == []


def _not_analysed_run(tmp_path: Path, toml: str = "", body_part: str = "CHEST",
                      manufacturer: str | None = None) -> list[Path]:
    """A two-image study with nothing in scope through the node's stage; the SR files made."""
    from sqlalchemy import select

    from dicomai.store import ResultObject
    from tests.helpers import make_study
    from tests.test_pipeline import run_stage

    study_uid, paths = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "s", copies=2,
                                  body_part=body_part)
    if manufacturer is not None:
        for p in paths:
            ds = dcmread(p)
            ds.Manufacturer = manufacturer
            ds.save_as(p)
    # the model's validated scope, as a real model's
    sessions = run_stage(tmp_path, study_uid, paths, toml, body_parts=["HAND", "WRIST"])
    with sessions() as s:
        rows = list(s.scalars(select(ResultObject).where(ResultObject.kind == "sr")))
    return [tmp_path / "data" / str(r.path) for r in rows]


def test_study_with_nothing_in_scope_gets_a_not_analysed_sr(tmp_path: Path) -> None:
    """A chest study: one SR, "NOT ANALYSED" in its description, every image "Not performed"
    with the scope rule as the reason, no finding value, no study result; valid DICOM."""
    (path,) = _not_analysed_run(tmp_path)
    assert _dciodvfy(path) == []
    sr = dcmread(path)
    assert sr.SeriesDescription == "AI fracture: NOT ANALYSED"
    dump = subprocess.run([dcmtk("dsrdump"), "+Pc", "+Pl", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.count('(262008008,SCT,"Not performed")') == 2
    assert dump.stdout.count("body part not analysed: CHEST (outside the model's validated scope)") == 2
    assert '(C0034375,UMLS,"Qualitative Evaluations")' not in dump.stdout
    assert "Present" not in dump.stdout and "Absent" not in dump.stdout


def test_not_analysed_sr_can_be_turned_off_and_is_not_made_for_own_objects(tmp_path: Path) -> None:
    """``results.not_analysed_sr = false``: no SR; the node's own objects routed back: no SR."""
    assert _not_analysed_run(tmp_path / "off", "[results]\nnot_analysed_sr = false\n") == []
    assert _not_analysed_run(tmp_path / "own", body_part="HAND", manufacturer="dicomai") == []


def test_scs_share_a_series_per_laterality(tmp_path: Path) -> None:
    """Left, right and left again in one study: two SC series, each of one laterality
    (Laterality is a series attribute); every SC valid DICOM; the SR references each SC in
    the series it was made in."""
    from sqlalchemy import select

    from dicomai.store import ResultObject
    from tests.helpers import make_study
    from tests.test_pipeline import run_stage

    study_uid, paths = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "s", copies=3, body_part="HAND")
    for path, side in zip(paths, "LRL", strict=True):
        ds = dcmread(path)
        ds.Laterality = side
        ds.save_as(path)
    sessions = run_stage(tmp_path, study_uid, paths)
    with sessions() as s:
        rows = list(s.scalars(select(ResultObject).where(ResultObject.kind.in_(("sc", "sr")))))
    scs = [dcmread(tmp_path / "data" / str(r.path)) for r in rows if r.kind == "sc"]
    (sr,) = [dcmread(tmp_path / "data" / str(r.path)) for r in rows if r.kind == "sr"]
    by_series: dict[str, set[str]] = {}
    for sc in scs:
        by_series.setdefault(sc.SeriesInstanceUID, set()).add(sc.Laterality)
        assert _dciodvfy(tmp_path / "data" / str(next(r.path for r in rows if r.sop_instance_uid
                                                       == sc.SOPInstanceUID))) == []
    assert sorted(by_series.values(), key=sorted) == [{"L"}, {"R"}]
    evidence = {ref.ReferencedSOPInstanceUID: series.SeriesInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert all(evidence[sc.SOPInstanceUID] == sc.SeriesInstanceUID for sc in scs)


def test_sr_states_the_thresholds_each_image_was_graded_by(tmp_path: Path) -> None:
    """With a site profile's own points for a body part, that image's group names its own
    thresholds (the Algorithm Parameters of TID 4019); the others the site-wide pair."""
    from highdicom.sr.utils import find_content_items
    from pydicom.sr.codedict import codes

    from dicomai.results.sr import structured_report

    findings, pkg = _study(tmp_path)
    findings[0] = dataclasses.replace(findings[0], thresholds=(0.05, 0.2))
    sr = structured_report(findings, Grade.POSITIVE, 0.93, pkg.manifest, (0.3, 0.7), UID(),
                           identity=findings[0].source)
    groups = [g for g in find_content_items(sr, name=codes.DCM.ImagingMeasurements)[0].ContentSequence
              if g.ValueType == "CONTAINER"]
    stated = [[i.TextValue for i in find_content_items(g, name=codes.DCM.AlgorithmParameters)
               if i.TextValue.startswith("high_")] for g in groups]
    assert stated == [["high_sensitivity=0.0500", "high_specificity=0.2000"]] + [
        ["high_sensitivity=0.3000", "high_specificity=0.7000"]] * 3
