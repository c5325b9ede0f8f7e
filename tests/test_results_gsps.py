"""Tests of the Grayscale Softcopy Presentation State: validity, what dcmtk reads and renders,
and its place among the node's results."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from highdicom import UID
from PIL import Image, ImageDraw
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicomai.config import load_settings
from dicomai.imaging.pixels import Window, WindowSource, to_display
from dicomai.model.classifier import Classifier
from dicomai.model.grading import Grade
from dicomai.model.package import Manifest, load_package
from dicomai.node import Triage
from dicomai.results.gsps import GSPS_LAYER, caption, presentation_state
from dicomai.results.region import box_outline
from dicomai.store import OutboxItem, ResultObject, StudyState, make_sessionmaker, open_database
from dicomai.studies import StudyMonitor
from tests.helpers import dcmtk, make_study, pydicom_data, shared_file
from tests.synthetic import hot_spot_model
from tests.test_pipeline import _rows
from tests.test_results import _dciodvfy

_SOURCES = {"RG3_UNCR.dcm": pydicom_data, "RG2_JPLL.dcm": shared_file, "dx_image.dcm": shared_file}


def _manifest(tmp_path: Path) -> Manifest:
    return load_package(hot_spot_model(tmp_path / "m")).manifest


def _box(ds: Dataset) -> tuple[int, int, int, int]:
    return (int(ds.Columns) // 3, int(ds.Rows) // 3, int(ds.Columns) // 2, int(ds.Rows) // 2)


def _all_messages(path: Path) -> list[str]:
    """dciodvfy's errors *and* warnings, but those the node cannot avoid (see ``_dciodvfy``)."""
    return _dciodvfy(path)


def _pgm(tmp_path: Path, image: Path, pstate: Path | None) -> tuple[np.ndarray, str]:
    """dcmtk's rendering of the image (through the presentation state) and its verbose dump."""
    out = tmp_path / f"{image.stem}-{pstate.stem if pstate else 'plain'}.pgm"
    args = [dcmtk("dcmp2pgm"), "-v"] + (["-p", str(pstate)] if pstate else []) + [str(image), str(out)]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return np.asarray(Image.open(out)).astype(np.float64), run.stdout + run.stderr


@pytest.mark.parametrize("name", sorted(_SOURCES))
def test_gsps_is_valid_and_outlines_the_hotspot(tmp_path: Path, name: str) -> None:
    """dciodvfy reports no error and no warning; highdicom's fields read back: the source
    referenced, the hotspot box as a PIXEL polyline on its own layer, the caption, the
    source's patient and study, INVERSE for a MONOCHROME1 source."""
    src = _SOURCES[name](name)
    ds = dcmread(src)
    box = _box(ds)
    gsps = presentation_state(ds, Grade.POSITIVE, 0.93, _manifest(tmp_path), box,
                              Window(0, 0, WindowSource.FILE), UID())
    path = tmp_path / "pr.dcm"
    gsps.save_as(path)
    assert _all_messages(path) == []
    back = dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1" and back.Modality == "PR"
    assert (back.StudyInstanceUID, back.PatientID, back.PatientName) == (
        ds.StudyInstanceUID, ds.PatientID, ds.PatientName)
    assert back.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == (
        ds.SOPInstanceUID)
    (annotation,) = back.GraphicAnnotationSequence
    assert annotation.GraphicLayer == GSPS_LAYER == back.GraphicLayerSequence[0].GraphicLayer
    (outline,) = annotation.GraphicObjectSequence
    assert (outline.GraphicType, outline.GraphicAnnotationUnits) == ("POLYLINE", "PIXEL")
    points = np.array(outline.GraphicData, dtype=np.float32).reshape(-1, 2)
    assert points.tolist() == box_outline(box).tolist()
    assert annotation.TextObjectSequence[0].UnformattedTextValue == caption(Grade.POSITIVE, 0.93)
    assert "POSITIVE (fracture present)" in caption(Grade.POSITIVE, 0.93)
    assert back.get("BodyPartExamined") == ds.get("BodyPartExamined") and back.SeriesDate and back.SeriesTime
    shape = "INVERSE" if ds.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
    assert back.PresentationLUTShape == shape
    assert float(back.SoftcopyVOILUTSequence[0].WindowCenter) == float(ds.WindowCenter)  # the file's


def test_dcmtk_renders_the_source_and_reads_the_outline(tmp_path: Path) -> None:
    """dcmp2pgm applies the GSPS to its source and renders it as the source's own window shows
    it (bone bright, not inverted); dcmtk reads the outline at the hotspot box on the finding's
    layer; drawn where dcmtk reads it, the outline's bright pixels lie on the box's edges only.

    dcmp2pgm rasterises shutters and overlays but not graphic annotations, so the outline is
    drawn here from the coordinates dcmtk parsed, as a viewer would draw them."""
    src = pydicom_data("RG3_UNCR.dcm")
    ds = dcmread(src)
    box = _box(ds)
    path = tmp_path / "pr.dcm"
    presentation_state(ds, Grade.POSITIVE, 0.93, _manifest(tmp_path), box, None, UID()).save_as(path)
    shown, dump = _pgm(tmp_path, src, path)
    plain, _ = _pgm(tmp_path, src, None)
    assert np.corrcoef(shown.ravel(), plain.ravel())[0, 1] > 0.99  # same polarity and window
    assert "window center=550 width=1024" in dump
    assert f"Graphic Layer #1 [{GSPS_LAYER}]" in dump and "type=polyline filled=no units=pixel" in dump
    assert caption(Grade.POSITIVE, 0.93) in dump
    coords = re.search(r"coordinates: ([\d.\\, ]+)", dump)
    assert coords is not None
    points = [tuple(float(v) for v in p.strip().split("\\")) for p in coords.group(1).split(",") if p.strip()]
    assert points == [tuple(p) for p in box_outline(box).tolist()]
    canvas = Image.fromarray(np.zeros_like(shown, dtype=np.uint8))
    ImageDraw.Draw(canvas).line(points, fill=255, width=1)
    rows, cols = np.nonzero(np.asarray(canvas) == 255)
    c0, r0, c1, r1 = box
    on_edge = (np.isin(cols, (c0, c1)) & (rows >= r0) & (rows <= r1)) | (
        np.isin(rows, (r0, r1)) & (cols >= c0) & (cols <= c1))
    assert len(rows) >= 4 * min(c1 - c0, r1 - r0) and on_edge.all()
    inside = shown[r0 + 5:r1 - 5, c0 + 5:c1 - 5]
    assert inside.std() > 1  # the bone under the outline is shown, not covered


def test_gsps_carries_the_analysis_window_when_the_file_has_none(tmp_path: Path) -> None:
    """A source without a window of its own is shown through the window the analysis used:
    dcmp2pgm's rendering matches the analysis's display."""
    src = shared_file("RG2_JPLL.dcm")
    ds = dcmread(src)
    for keyword in ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation"):
        ds.pop(keyword, None)
    shown_by_analysis = to_display(ds)
    assert shown_by_analysis.window.source == WindowSource.PERCENTILE
    ds.decompress()  # dcmp2pgm has no JPEG decoder
    stripped = tmp_path / "nowindow.dcm"
    ds.save_as(stripped)
    path = tmp_path / "pr.dcm"
    presentation_state(ds, Grade.DOUBTFUL, 0.4, _manifest(tmp_path), _box(ds), shown_by_analysis.window,
                       UID()).save_as(path)
    assert _all_messages(path) == []
    voi = dcmread(path).SoftcopyVOILUTSequence[0]
    assert float(voi.WindowCenter) == pytest.approx(shown_by_analysis.window.center, abs=0.01)
    shown, _ = _pgm(tmp_path, stripped, path)
    assert np.corrcoef(shown.ravel(), shown_by_analysis.image.ravel())[0, 1] > 0.99


def test_negative_image_gets_the_caption_only(tmp_path: Path) -> None:
    """A negative image gets no outline (it would point at a fracture the model rules out),
    only the caption, at the bottom: viewers print their own text in the top corners."""
    ds = dcmread(pydicom_data("RG3_UNCR.dcm"))
    gsps = presentation_state(ds, Grade.NEGATIVE, 0.05, _manifest(tmp_path), _box(ds), None, UID())
    (annotation,) = gsps.GraphicAnnotationSequence
    assert "GraphicObjectSequence" not in annotation
    (text,) = annotation.TextObjectSequence
    assert text.BoundingBoxAnnotationUnits == "DISPLAY" and text.BoundingBoxTopLeftHandCorner[1] > 0.5


def test_colour_image_and_stray_region_are_refused(tmp_path: Path) -> None:
    """A colour image (no grayscale presentation state can reference it) and a region outside
    the image raise ValueError."""
    ds = dcmread(pydicom_data("RG3_UNCR.dcm"), stop_before_pixels=True)
    with pytest.raises(ValueError, match="outside"):
        presentation_state(ds, Grade.POSITIVE, 0.9, _manifest(tmp_path), (0, 0, 5000, 10), None, UID())
    ds.SamplesPerPixel = 3
    with pytest.raises(ValueError, match="single-sample"):
        presentation_state(ds, Grade.POSITIVE, 0.9, _manifest(tmp_path), None, None, UID())


def test_node_makes_keeps_and_queues_a_gsps_per_analysed_image(tmp_path: Path) -> None:
    """Through the node's stage: each analysed image gets a GSPS, recorded with the SR and
    queued only to the destinations whose outputs include "gsps"; it references its source
    and outlines the same region as the SR's."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 9\n'
                   '[[destinations]]\nname = "viewer"\nae_title = "VIEWER"\nhost = "127.0.0.1"\nport = 9\n'
                   'outputs = ["gsps"]\n')
    settings = load_settings(cfg, environ={"DICOMAI_NODE__DATA_DIR": str(tmp_path / "data")})
    sessions = make_sessionmaker(open_database(settings.database_url))
    pkg = load_package(hot_spot_model(tmp_path / "model"))
    stage = Triage(settings, sessions, pkg, Classifier(pkg))
    monitor = StudyMonitor(sessions, Path("/"), 0.0, stage)
    study_uid, paths = make_study([pydicom_data("RG3_UNCR.dcm"), shared_file("RG2_JPLL.dcm")], tmp_path / "s")
    uids = [(dcmread(p, stop_before_pixels=True).SOPInstanceUID, p) for p in paths]
    _rows(sessions, study_uid, uids, state=StudyState.RECEIVING)
    assert monitor.poll() == 1
    with sessions() as s:
        rows = s.scalars(select(ResultObject).where(ResultObject.kind == "gsps")).all()
        sent = sorted((o.destination, k) for o, k in s.execute(
            select(OutboxItem, ResultObject.kind).join(ResultObject,
                                                       ResultObject.id == OutboxItem.result_id)))
    assert len(rows) == 2 and all(r.path for r in rows)
    assert sent == [("pacs", "sc"), ("pacs", "sc"), ("pacs", "sr"), ("viewer", "gsps"), ("viewer", "gsps")]
    states = [dcmread(tmp_path / "data" / str(r.path)) for r in rows]
    refs = {g.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID for g in states}
    assert refs == {uid for uid, _ in uids}
    assert sorted(g.InstanceNumber for g in states) == [1, 2]
    assert all(g.StudyInstanceUID == study_uid for g in states)
    for path in (tmp_path / "data" / str(r.path) for r in rows):
        assert _dciodvfy(path) == []
