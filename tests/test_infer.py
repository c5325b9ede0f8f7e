"""Tests of preprocessing, ONNX inference, Grad-CAM placement and grading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomai.imaging.gradcam import gradcam_on_image
from dicomai.model.classifier import Classifier, preprocess
from dicomai.model.grading import Grade, grade_image, grade_study
from dicomai.model.package import ModelError, OperatingPoints, load_package
from tests.synthetic import hot_spot_model


def _spot_image(h: int, w: int, y: int, x: int, r: int = 20) -> np.ndarray:
    img = np.full((h, w), 0.1, np.float32)
    img[max(0, y - r):y + r, max(0, x - r):x + r] = 1.0
    return img


def test_gradcam_lands_on_the_spot_of_a_letterboxed_image(tmp_path: Path) -> None:
    """Through a real ONNX graph, the map's peak lands on a spot in a wide, non-square image."""
    pkg = load_package(hot_spot_model(tmp_path / "m"))
    clf = Classifier(pkg, threads=1)
    img = _spot_image(600, 1400, y=450, x=1200, r=60)  # wide: padded top and bottom
    (out,) = clf.predict([preprocess(img, pkg)])
    assert out.gradcam is not None and out.gradcam.shape == (7, 7)
    geom = preprocess(img, pkg).geometry
    assert geom.top > 0 and geom.left == 0
    cam = gradcam_on_image(out.gradcam, geom)
    assert cam.shape == img.shape and cam.max() == pytest.approx(1.0)
    y, x = np.unravel_index(np.argmax(cam), cam.shape)
    assert abs(y - 450) < 120 and abs(x - 1200) < 120, (y, x)
    assert cam[:100, :300].max() < 0.5  # far from the spot the map is cold


def test_batch_probabilities_and_grades(tmp_path: Path) -> None:
    """A batch gives one probability per image; a spot grades positive, a flat image negative."""
    pkg = load_package(hot_spot_model(tmp_path / "m"))
    clf = Classifier(pkg)
    flat = np.full((300, 200), 0.1, np.float32)
    outs = clf.predict([preprocess(_spot_image(300, 200, 150, 100, 40), pkg), preprocess(flat, pkg)])
    points = pkg.manifest.operating_points
    assert outs[0].probability > 0.9 and outs[1].probability < 0.05
    assert [grade_image(o.probability, points) for o in outs] == [Grade.POSITIVE, Grade.NEGATIVE]


def test_a_study_of_many_images_runs_one_image_at_a_time(tmp_path: Path) -> None:
    """The node's classifier runs one image per onnxruntime run whatever the study's size (the
    run's buffers, which onnxruntime keeps, then do not grow with it), with the results a
    single batched run gives, in order."""
    pkg = load_package(hot_spot_model(tmp_path / "m"))
    images = [_spot_image(300, 200, 150, 100, 40), np.full((300, 200), 0.1, np.float32),
              _spot_image(400, 700, 100, 600, 50), np.full((500, 500), 0.3, np.float32),
              _spot_image(250, 250, 200, 30, 30)]
    inputs = [preprocess(img, pkg) for img in images]
    clf = Classifier(pkg, threads=1)
    session_run = clf.session.run
    batches: list[int] = []

    def counted(names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        batches.extend(len(v) for v in feed.values())
        return session_run(names, feed)

    clf.session.run = counted  # type: ignore[method-assign]
    outs = clf.predict(inputs)
    assert batches == [1] * len(images)
    together = Classifier(pkg, threads=1, max_batch=len(images)).predict(inputs)
    assert [o.probability for o in outs] == pytest.approx([o.probability for o in together], abs=1e-5)
    for one, batched in zip(outs, together, strict=True):
        assert one.gradcam is not None and batched.gradcam is not None
        np.testing.assert_allclose(one.gradcam, batched.gradcam, atol=1e-5)
    assert outs[0].probability > 0.9 and outs[1].probability < 0.05  # in the inputs' order


def test_analysed_images_keep_their_headers_and_free_their_pixels_in_turn(tmp_path: Path) -> None:
    """Each image keeps its header and loses its pixel data (and pydicom's decoded copy) once
    the analysis has looked at it, analysed or out of scope, before the next image is read;
    the display image carries the picture on."""
    from pydicom import dcmread

    from dicomai.analysis.image import Analyser
    from dicomai.config import ScopeConfig
    from tests.helpers import pydicom_data

    pkg = load_package(hot_spot_model(tmp_path / "m"))
    analyser = Analyser(ScopeConfig(body_parts=["EXTREMITY"]), pkg, Classifier(pkg, threads=1),
                        pkg.manifest.operating_points)
    read: list = []
    held: list[list[bool]] = []  # at each read: which images read before still hold pixels

    def sources(parts: list[str]):  # type: ignore[no-untyped-def]
        for part in parts:
            held.append(["PixelData" in ds for ds in read])
            ds = dcmread(pydicom_data("RG3_UNCR.dcm"))
            ds.BodyPartExamined = part
            read.append(ds)
            yield ds

    got = analyser.analyse(sources(["EXTREMITY", "CHEST", "EXTREMITY"]))
    assert held == [[], [False], [False, False]]
    assert [g.grade for g in got][1] == Grade.NOT_ANALYSED and got[0].analysed and got[2].analysed
    shown = read[0]
    assert got[0].source is shown and got[0].display is not None
    assert got[0].display.shape == (shown.Rows, shown.Columns)
    assert "PixelData" not in shown and shown._pixel_array is None
    assert got[0].timings.infer_ms is not None and got[0].timings.infer_ms > 0


def test_model_without_gradcam_still_classifies(tmp_path: Path) -> None:
    """Without a Grad-CAM output the probability is still given; the map is unavailable."""
    pkg = load_package(hot_spot_model(tmp_path / "m", gradcam=False))
    (out,) = Classifier(pkg).predict([preprocess(np.zeros((50, 80), np.float32), pkg)])
    assert out.gradcam is None and 0.0 <= out.probability <= 1.0


def test_manifest_graph_mismatch_is_refused(tmp_path: Path) -> None:
    """A manifest whose input size differs from the graph's is refused at load."""
    d = hot_spot_model(tmp_path / "m")
    import json

    data = json.loads((d / "model.json").read_text())
    data["input"]["height"] = 256
    (d / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="does not match"):
        Classifier(load_package(d))


def test_grading_rules() -> None:
    """Thresholds are inclusive; the study takes its highest analysed image; failures don't hide."""
    pts = OperatingPoints(high_sensitivity=0.2, high_specificity=0.8)
    assert grade_image(0.8, pts) == Grade.POSITIVE
    assert grade_image(0.2, pts) == Grade.DOUBTFUL
    assert grade_image(0.19, pts) == Grade.NEGATIVE
    assert grade_study([(Grade.NEGATIVE, 0.1), (Grade.FAILED, None), (Grade.DOUBTFUL, 0.5)]) == (
        Grade.DOUBTFUL, 0.5)
    assert grade_study([(Grade.FAILED, None)]) == (Grade.FAILED, None)
    assert grade_study([(Grade.NOT_ANALYSED, None)]) == (Grade.NOT_ANALYSED, None)
    assert grade_study([]) == (Grade.NOT_ANALYSED, None)
    with pytest.raises(ValueError):
        grade_image(1.5, pts)


def test_configured_thresholds_override_the_manifest(tmp_path: Path) -> None:
    """model.high_sensitivity / high_specificity in the configuration replace the manifest's."""
    from dicomai.analysis.image import operating_points
    from dicomai.config import load_settings

    pkg = load_package(hot_spot_model(tmp_path / "m", thresholds=(0.3, 0.7)))
    default = operating_points(load_settings(environ={}), pkg)
    assert (default.high_sensitivity, default.high_specificity) == (0.3, 0.7)
    env = {"DICOMAI_MODEL__HIGH_SENSITIVITY": "0.1", "DICOMAI_MODEL__HIGH_SPECIFICITY": "0.9"}
    custom = operating_points(load_settings(environ=env), pkg)
    assert (custom.high_sensitivity, custom.high_specificity) == (0.1, 0.9)
    assert grade_image(0.8, custom) == Grade.DOUBTFUL and grade_image(0.8, default) == Grade.POSITIVE
    with pytest.raises(ValueError):
        operating_points(load_settings(environ={"DICOMAI_MODEL__HIGH_SENSITIVITY": "0.95"}), pkg)
