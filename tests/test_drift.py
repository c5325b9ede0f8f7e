"""Tests of the drift watch: PSI of the node's scores against the manifest's reference."""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

import pytest

from dicomai.cli import main
from dicomai.model.drift import MIN_IMAGES, PSI_WARN, bin_counts, drift, psi
from dicomai.model.package import OperatingPoints, ScoreReference, load_package
from dicomai.node import default_model_dir
from dicomai.store import Instance, Series, Study, make_sessionmaker, open_database
from dicomai.store.models import Prediction
from tests.synthetic import hot_spot_model

UNIFORM = ScoreReference(edges=[i / 10 for i in range(1, 10)], images=1000, data="uniform",
                         high_sensitivity_rate=0.7, high_specificity_rate=0.3)
POINTS = OperatingPoints(high_sensitivity=0.3, high_specificity=0.7)


def test_bins_and_psi() -> None:
    """Scores fall in half-open bins; identical shares give a PSI of 0."""
    assert bin_counts([0.0, 0.1, 0.15, 0.95, 1.0], [0.1, 0.5]) == [1, 2, 2]
    assert psi([0.5, 0.5], [10, 10]) == pytest.approx(0.0)
    assert psi([0.5, 0.5], [0, 10]) > 1


def test_shifted_stream_crosses_the_threshold() -> None:
    """Scores like the reference's stay below the threshold; shifted up, they cross it."""
    rng = random.Random(0)
    same = [rng.random() for _ in range(1000)]
    shifted = [rng.random() ** 0.4 for _ in range(1000)]  # most images now score high
    steady, moved = drift(UNIFORM, same, POINTS), drift(UNIFORM, shifted, POINTS)
    assert steady.psi is not None and steady.psi < 0.05 and not steady.drifted
    assert moved.psi is not None and moved.psi > PSI_WARN and moved.drifted
    assert moved.high_sensitivity_rate is not None and moved.high_sensitivity_rate > 0.85
    few = drift(UNIFORM, shifted[:MIN_IMAGES - 1], POINTS)
    assert few.psi is not None and few.psi > PSI_WARN and not few.drifted  # too few to say


def test_shipped_manifest_has_a_reference() -> None:
    """The shipped model carries the deciles of its validation scores."""
    directory = default_model_dir()
    assert directory is not None
    ref = load_package(directory, check_hash=False).manifest.reference
    assert ref is not None and len(ref.scores.edges) == 9 and ref.scores.images == 488


def _predictions(url: str, scores: list[float], part: str, sha256: str) -> None:
    now = dt.datetime.now(dt.UTC)
    with make_sessionmaker(open_database(url)).begin() as s:
        study = Study(study_instance_uid=f"1.2.{part}", state="processed", first_received_at=now,
                      last_received_at=now, state_changed_at=now, grade="positive", probability=max(scores))
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=f"1.2.{part}.1", body_part=part)
        s.add(series)
        s.flush()
        for n, p in enumerate(scores):
            inst = Instance(study_id=study.id, series_id=series.id, sop_instance_uid=f"1.2.{part}.1.{n}",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                            transfer_syntax_uid="1.2.840.10008.1.2.1", size_bytes=1, sha256="0" * 64,
                            spool_path="x", state="processed", received_at=now)
            s.add(inst)
            s.flush()
            s.add(Prediction(study_id=study.id, instance_id=inst.id, level="image", run=1, probability=p,
                             grade="positive", model_sha256=sha256, created_at=now))


def test_model_drift_reports_a_shifted_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`dicomai model drift` shows the PSI per body part and warns when all images drifted."""
    directory = hot_spot_model(tmp_path / "model")
    manifest = json.loads((directory / "model.json").read_text())
    manifest["reference"] = {"scores": UNIFORM.model_dump()}
    (directory / "model.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("DICOMAI_MODEL__PATH", str(directory))
    data = tmp_path / "data"
    url = f"sqlite:///{data / 'audit.sqlite3'}"
    rng = random.Random(0)
    _predictions(url, [rng.random() ** 0.4 for _ in range(150)], "HAND", manifest["sha256"])
    _predictions(url, [rng.random() ** 0.4 for _ in range(50)], "FOOT", manifest["sha256"])
    _predictions(url, [0.0] * 500, "KNEE", "f" * 64)  # another model's scores do not count
    assert main(["--data-dir", str(data), "model", "drift", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["images"] == 200 and out["psi"] > PSI_WARN and out["drifted"] is True
    assert set(out["body_parts"]) == {"HAND", "FOOT"} and out["body_parts"]["FOOT"]["enough"] is False
    assert "the scores have drifted" in captured.err
