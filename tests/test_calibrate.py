"""Tests of site calibration: thresholds from labelled cases, the refusal rule, the audited profile."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from dicomai.analysis.image import operating_points
from dicomai.cli import main
from dicomai.config import load_settings
from dicomai.model.calibration import (
    InsufficientSample,
    calibrate,
    calibrate_site,
    threshold_for_sensitivity,
    threshold_for_specificity,
)
from dicomai.model.package import load_package
from dicomai.model.profile import PROFILE_NAME, load_profile
from dicomai.store import Event, make_sessionmaker, open_database
from tests.synthetic import hot_spot_model


def _p(level: int) -> float:
    """The hot-spot model's probability for a 32x32 block of grey ``level`` (0-255)."""
    return 1 / (1 + math.exp(-10 * (level / 255 - 0.5)))


def _sample(folder: Path, positives: int, negatives: int,
            seed: int = 0) -> tuple[Path, list[tuple[int, bool]]]:
    """PNGs with one bright block whose grey level steers P(fractured); positives brighter on average."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    cases = [(rng.randint(110, 255), True) for _ in range(positives)]
    cases += [(rng.randint(0, 150), False) for _ in range(negatives)]
    table = folder / "cases.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "body_part"])
        for n, (level, fractured) in enumerate(cases):
            pixels = np.zeros((224, 224), np.uint8)
            pixels[96:128, 96:128] = level
            Image.fromarray(pixels).save(folder / f"{n}.png")
            w.writerow([f"{n}.png", int(fractured), "HAND" if n % 2 else "FOOT"])
    return table, cases


@pytest.fixture
def model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = hot_spot_model(tmp_path / "model", thresholds=(0.3, 0.7))
    monkeypatch.setenv("DICOMAI_MODEL__PATH", str(directory))
    monkeypatch.setenv("DICOMAI_MODEL__THREADS", "1")
    monkeypatch.setenv("DICOMAI_MODEL__PROVIDERS", '["CPUExecutionProvider"]')
    return directory


def test_thresholds_reach_the_targets() -> None:
    """The highest threshold reaching the sensitivity, the lowest reaching the specificity."""
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    labels = [False] * 5 + [True] * 5
    assert threshold_for_sensitivity(scores, labels, 0.8) == 0.7  # 4 of 5 positives at or above
    assert threshold_for_sensitivity(scores, labels, 1.0 - 1e-9) == 0.6
    t = threshold_for_specificity(scores, labels, 0.8)  # 4 of 5 negatives below
    assert 0.4 < t <= 0.4 + 1e-12
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity([0.1], [False], 0.9)


def test_too_few_positives_are_refused() -> None:
    """20 positives cannot show a sensitivity of 0.9 to within 0.05: refused, with the numbers."""
    scores = [i / 40 for i in range(40)]
    labels = [i >= 20 for i in range(40)]
    with pytest.raises(InsufficientSample, match="too few cases to show sensitivity 0.90"):
        calibrate(scores, labels, 0.9)
    assert calibrate(scores, labels, 0.9, margin=0.3).positives == 20


def test_body_parts_get_their_own_points_where_the_sample_allows() -> None:
    """A body part with enough cases gets its own thresholds; a small one uses the site's."""
    rng = random.Random(1)
    scores, labels, parts = [], [], []
    for part, n in (("HAND", 600), ("FOOT", 40)):
        for _ in range(n):
            y = rng.random() < 0.5
            scores.append(min(1.0, max(0.0, rng.gauss(0.7 if y else 0.3, 0.15))))
            labels.append(y)
            parts.append(part)
    got = calibrate_site(scores, labels, parts, 0.9, 0.9)
    assert set(got.body_parts) == {"HAND"} and "too few cases" in got.skipped["FOOT"]
    hand = got.body_parts["HAND"]
    assert hand.at_high_sensitivity.sensitivity.value is not None
    assert hand.at_high_sensitivity.sensitivity.value >= 0.9
    assert hand.high_sensitivity <= (hand.high_specificity or 1.0)


def test_calibrate_reaches_the_sensitivity_and_the_node_uses_the_profile(
        tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """On a labelled synthetic sample: sensitivity reached, profile written and audited, then used."""
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'audit.sqlite3'}"
    open_database(url)
    table, cases = _sample(tmp_path / "cases", positives=240, negatives=240)
    assert main(["--data-dir", str(data), "calibrate", str(table), "--target-sensitivity", "0.9",
                 "--target-specificity", "0.9", "--by", "dr-a"]) == 0
    out = capsys.readouterr().out
    assert "calibrated hot-spot-test 1.0.0 on 480 cases (240 fractured) by dr-a" in out

    profile = load_profile(data)
    assert profile is not None and profile.by == "dr-a" and profile.cases == 480
    hs, hp = profile.operating_points.high_sensitivity, profile.operating_points.high_specificity
    # checked against the probabilities the model gives by construction, not the command's own
    # figures; the model computes in float32 (1e-4 is far below one grey level's step, ~0.01)
    caught = sum(_p(level) >= hs - 1e-4 for level, y in cases if y)
    cleared = sum(_p(level) < hp + 1e-4 for level, y in cases if not y)
    assert caught / 240 >= 0.9 and cleared / 240 >= 0.9
    assert (hs, hp) != (0.3, 0.7)
    assert set(profile.figures["skipped_body_parts"]) == {"FOOT", "HAND"}  # 120 positives each: too few

    with make_sessionmaker(open_database(url, create=False))() as s:
        (event,) = s.scalars(select(Event).where(Event.event == "site.calibrated")).all()
    assert event.details is not None and event.details["by"] == "dr-a" and event.details["cases"] == 480
    assert event.details["operating_points"] == {"high_sensitivity": hs, "high_specificity": hp}

    settings = load_settings(None, {"node": {"data_dir": data}})
    package = load_package(model)
    assert operating_points(settings, package).high_sensitivity == hs
    assert operating_points(settings, package).high_specificity == hp
    overridden = load_settings(None, {"node": {"data_dir": data}, "model": {"high_sensitivity": 0.05}})
    assert operating_points(overridden, package).high_sensitivity == 0.05


def test_too_small_a_sample_is_refused(tmp_path: Path, model: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 1 with one clear line; no profile, no audit event."""
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'audit.sqlite3'}"
    open_database(url)
    table, _ = _sample(tmp_path / "cases", positives=30, negatives=30)
    assert main(["--data-dir", str(data), "calibrate", str(table), "--target-sensitivity", "0.9"]) == 1
    err = capsys.readouterr().err
    assert "calibration refused, nothing written: too few cases to show sensitivity 0.90" in err
    assert "(60 usable cases of 60)" in err
    # the manifest lists only HAND: the FOOT images are not in the model's scope and do not count
    manifest = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**manifest, "body_parts": ["HAND"]}))
    assert main(["--data-dir", str(data), "calibrate", str(table), "--target-sensitivity", "0.9"]) == 1
    assert "(30 usable cases of 60)" in capsys.readouterr().err
    assert not (data / PROFILE_NAME).exists()
    with make_sessionmaker(open_database(url, create=False))() as s:
        assert not s.scalars(select(Event).where(Event.event == "site.calibrated")).all()


def test_profile_of_another_model_is_ignored(tmp_path: Path, model: Path) -> None:
    """A profile calibrated for another model never sets this model's thresholds."""
    data = tmp_path / "data"
    data.mkdir()
    (data / PROFILE_NAME).write_text(json.dumps({
        "model_name": "other", "model_version": "1", "model_sha256": "0" * 64,
        "created_at": "2026-01-01T00:00:00Z", "by": "x", "cases": 500, "positives": 250,
        "targets": {"sensitivity": 0.9}, "operating_points": {"high_sensitivity": 0.01,
                                                              "high_specificity": 0.02}}))
    settings = load_settings(None, {"node": {"data_dir": data}})
    assert operating_points(settings, load_package(model)).high_sensitivity == 0.3


def test_calibrate_from_feedback_uses_the_recorded_probabilities(
        tmp_path: Path, model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Studies with a radiologist's read are a labelled sample: their recorded probabilities count,
    those of the model in use only (a study graded before an upgrade has another model's score);
    a body part is one group however the modality spelled it."""
    import datetime as dt

    from dicomai.store import Series, Study
    from dicomai.store.feedback import record_feedback
    from dicomai.store.models import FeedbackRead, Prediction

    data = tmp_path / "data"
    maker = make_sessionmaker(open_database(f"sqlite:///{data / 'audit.sqlite3'}"))
    now, rng = dt.datetime.now(dt.UTC), random.Random(2)
    ours = load_package(model).manifest.sha256
    with maker.begin() as s:
        for n in range(700):
            fractured = n % 2 == 0
            p = min(1.0, max(0.0, rng.gauss(0.75 if fractured else 0.25, 0.15)))
            by_old_model = n >= 500  # scores that say the opposite: they would wreck the points
            if by_old_model:
                p = 1.0 - p
            study = Study(study_instance_uid=f"1.2.{n}", state="processed", first_received_at=now,
                          last_received_at=now, state_changed_at=now, grade="negative", probability=p)
            s.add(study)
            s.flush()
            s.add(Series(study_id=study.id, series_instance_uid=f"1.2.{n}.1",
                         body_part=("WRIST", "Wrist", "L_WRIST")[n % 3]))
            for run, sha in ((1, "0" * 64), (2, "0" * 64 if by_old_model else ours)):
                s.add(Prediction(study_id=study.id, level="study", run=run, model_sha256=sha, probability=p,
                                 grade="negative", created_at=now))
            s.flush()
            read = FeedbackRead.FRACTURE if fractured else FeedbackRead.NO_FRACTURE
            record_feedback(s, f"1.2.{n}", read, "dr-a")
    assert main(["--data-dir", str(data), "calibrate", "--from-feedback", "--target-sensitivity", "0.9",
                 "--target-specificity", "0.9", "--json"]) == 0
    captured = capsys.readouterr()
    profile = json.loads(captured.out)
    assert profile["cases"] == 500 and profile["positives"] == 250
    assert profile["figures"]["unusable_cases"] == 200
    assert profile["figures"]["unusable_reasons"] == {"graded by another model": 200}
    assert "left out: 200 cases: graded by another model" in captured.err
    assert profile["figures"]["overall"]["at_high_sensitivity"]["sensitivity"]["value"] >= 0.9
    # "WRIST", "Wrist" and "L_WRIST" are one body part: 250 fractured wrists, enough for their own points
    assert set(profile["body_parts"]) == {"WRIST"} and profile["body_parts"]["WRIST"]["cases"] == 500


def test_node_grades_each_body_part_by_its_own_points(tmp_path: Path, model: Path) -> None:
    """A profile with points for HAND grades hand images by them (and records them), other
    body parts by the site's points."""
    from pydicom import dcmread

    from dicomai.analysis.image import Analyser
    from dicomai.model.classifier import Classifier
    from tests.helpers import pydicom_data

    package = load_package(model)
    data = tmp_path / "data"
    data.mkdir()
    (data / PROFILE_NAME).write_text(json.dumps({
        "model_name": package.manifest.name, "model_version": package.manifest.version,
        "model_sha256": package.manifest.sha256, "created_at": "2026-01-01T00:00:00Z", "by": "x",
        "cases": 500, "positives": 250, "targets": {"sensitivity": 0.9},
        "operating_points": {"high_sensitivity": 0.98, "high_specificity": 0.99},
        "body_parts": {"HAND": {"operating_points": {"high_sensitivity": 0.0, "high_specificity": 0.0},
                                "cases": 300, "positives": 150}}}))
    settings = load_settings(None, {"node": {"data_dir": data}, "scope": {"min_size_px": 1}})
    analyser = Analyser.in_force(settings, package, Classifier(package))
    hand, foot, right = (dcmread(pydicom_data("RG3_UNCR.dcm")) for _ in range(3))
    hand.BodyPartExamined, foot.BodyPartExamined, right.BodyPartExamined = "HAND", "FOOT", "HAND RIGHT"
    by_hand, by_foot, by_right = analyser.analyse([hand, foot, right], apply_scope=False)
    assert by_hand.probability == by_foot.probability
    assert by_right.grade == by_hand.grade and by_right.points == by_hand.points  # a site's spelling
    assert by_hand.grade == "positive" and by_hand.points is not None
    assert by_hand.points.high_specificity == 0.0
    assert by_foot.points is not None and by_foot.points.high_specificity == 0.99
    assert by_foot.grade == "negative" or by_foot.probability >= 0.98


def test_csv_body_parts_are_grouped_as_the_node_reads_them(tmp_path: Path, model: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """"Lower Leg", "lower_leg" and "LOWERLEG" are one body part, keyed as the node looks it up;
    an Excel CSV (UTF-8 with a byte-order mark) is read."""
    data = tmp_path / "data"
    open_database(f"sqlite:///{data / 'audit.sqlite3'}")
    table, _ = _sample(tmp_path / "cases", positives=480, negatives=480)
    rows = table.read_text().splitlines()
    spellings = ("Lower Leg", "lower_leg", "LOWERLEG")
    rows = [rows[0]] + [r.rsplit(",", 1)[0] + "," + spellings[n % 3] for n, r in enumerate(rows[1:])]
    table.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    manifest = json.loads((model / "model.json").read_text())
    (model / "model.json").write_text(json.dumps({**manifest, "body_parts": ["LOWERLEG"]}))
    assert main(["--data-dir", str(data), "calibrate", str(table), "--target-sensitivity", "0.9",
                 "--json"]) == 0
    captured = capsys.readouterr()
    profile = json.loads(captured.out)
    assert profile["cases"] == 960 and set(profile["body_parts"]) == {"LOWERLEG"}
    assert "note: 960 PNG/JPEG cases scored from their 8-bit grey pixels" in captured.err
    points = load_profile(data)
    assert points is not None
    assert points.points("Lower Leg") == points.body_parts["LOWERLEG"].operating_points


@pytest.mark.parametrize("margin", ["-0.01", "0.11", "1"])
def test_the_refusal_rule_cannot_be_switched_off(tmp_path: Path, model: Path, margin: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """--margin is bounded: a margin of 1 would accept any sample, however small."""
    data = tmp_path / "data"
    open_database(f"sqlite:///{data / 'audit.sqlite3'}")
    table, _ = _sample(tmp_path / "cases", positives=30, negatives=30)
    assert main(["--data-dir", str(data), "calibrate", str(table), "--target-sensitivity", "0.9",
                 "--margin", margin]) == 2
    assert "--margin must lie between 0 and 0.1" in capsys.readouterr().err
    assert not (data / PROFILE_NAME).exists()


def test_a_study_is_calibrated_under_the_body_part_its_score_came_from(db_url: str) -> None:
    """A study's body part and model are those of the image its score came from: the highest
    probability among each image's latest result, over all runs (a reopened study analyses
    only its new images); a study without image results keeps its first named body part."""
    import datetime as dt

    from dicomai.store import Series, Study
    from dicomai.store.feedback import study_scores
    from dicomai.store.models import Prediction
    from tests.helpers import received_instance

    maker = make_sessionmaker(open_database(db_url))
    now = dt.datetime.now(dt.UTC)
    # uid -> images: (body part, [(run, grade, probability, model)] of each result, oldest first)
    studies = {
        "1.2.1": [("CHEST", [(1, "not_analysed", None, "a")]), ("HAND", [(1, "positive", 0.9, "a")]),
                  ("FOOT", [(1, "negative", 0.2, "a")])],
        "1.2.2": [("HAND", [(1, "positive", 0.9, "a")]), ("FOOT", [(2, "negative", 0.1, "b")])],
        "1.2.3": [("HAND", [(1, "positive", 0.9, "a"), (2, "negative", 0.2, "b")]),
                  ("KNEE", [(2, "doubtful", 0.5, "b")])],
        "1.2.4": [],
    }
    with maker.begin() as s:
        for uid, images in studies.items():
            study = Study(study_instance_uid=uid, state="processed", first_received_at=now,
                          last_received_at=now, state_changed_at=now, grade="positive", probability=0.9)
            s.add(study)
            s.flush()
            s.add(Series(study_id=study.id, series_instance_uid=f"{uid}.0", body_part="WRIST"))
            for n, (part, results) in enumerate(images, start=1):
                series = Series(study_id=study.id, series_instance_uid=f"{uid}.{n}", body_part=part)
                s.add(series)
                s.flush()
                inst = received_instance(s, study.id, series.id, f"{uid}.{n}.1", now)
                for run, grade, p, model in results:
                    s.add(Prediction(study_id=study.id, instance_id=inst.id, level="image", run=run,
                                     grade=grade, probability=p, model_sha256=model * 64, created_at=now))
                    s.flush()
            s.add(Prediction(study_id=study.id, level="study", run=1, grade="positive", probability=0.9,
                             model_sha256="c" * 64, created_at=now))
    with maker() as s:
        scores = study_scores(s, list(studies))
    assert [(scores[u].body_part, scores[u].model_sha256) for u in studies] == [
        ("HAND", "a" * 64), ("HAND", "a" * 64), ("KNEE", "b" * 64), ("WRIST", "c" * 64)]
