"""Tests of the drift watch: PSI of the node's scores against the manifest's reference."""

from __future__ import annotations

import datetime as dt
import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomai.cli import main
from dicomai.imaging.stats import ImageStats
from dicomai.model.drift import MIN_IMAGES, PSI_WARN, Sample, bin_counts, drift, psi, watch
from dicomai.model.package import IntensityReference, OperatingPoints, Reference, ScoreReference, load_package
from dicomai.node import default_model_dir
from dicomai.store import Series, Study, make_sessionmaker, open_database
from dicomai.store.models import Prediction
from tests.helpers import received_instance
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
    """The shipped model carries the deciles of its validation scores and intensities."""
    directory = default_model_dir()
    assert directory is not None
    ref = load_package(directory, check_hash=False).manifest.reference
    assert ref is not None and len(ref.scores.edges) == 9 and ref.scores.images == 488
    assert ref.intensity is not None and len(ref.intensity.edges) == 9 and ref.intensity.images == 488


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
            inst = received_instance(s, study.id, series.id, f"1.2.{part}.1.{n}", now)
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
    assert out["body_parts"]["HAND"]["psi"] > PSI_WARN and "drifted" not in out["body_parts"]["HAND"]
    assert "the scores have drifted from the validation set's (all images: PSI" in captured.err
    assert "(body_part" not in captured.err


INTENSITY = IntensityReference(edges=[i / 10 for i in range(1, 10)], images=1000, data="uniform")


def _samples(rng: random.Random, n: int, maker: str, intensity: Callable[[], float],
             part: str = "HAND") -> list[Sample]:
    return [Sample(rng.random(), part, ImageStats(rows=2000, columns=1600, bits_stored=12,
                                                  mean_intensity=intensity(), manufacturer=maker))
            for _ in range(n)]


def test_intensity_shift_is_the_drift_of_its_manufacturer() -> None:
    """Scores steady, but one manufacturer's images are much brighter once windowed: its
    group's intensity PSI passes the threshold, the other's does not, and neither counts as
    drifted (that verdict is the scores'); sizes and bit depths are summarised."""
    rng = random.Random(1)
    steady = _samples(rng, 300, "Acme Medical", rng.random)
    bright = _samples(rng, 300, "Brightco", lambda: 0.85 + 0.1 * rng.random())
    groups = watch(Reference(scores=UNIFORM, intensity=INTENSITY), steady + bright, POINTS)
    assert set(groups) == {"all", "body_part=HAND", "manufacturer=ACMEMEDICAL", "manufacturer=BRIGHTCO"}
    acme, bco = groups["manufacturer=ACMEMEDICAL"], groups["manufacturer=BRIGHTCO"]
    assert acme.psi is not None and acme.psi < PSI_WARN and bco.psi is not None and bco.psi < PSI_WARN
    assert acme.intensity_psi is not None and acme.intensity_psi < 0.05 and not acme.drifted
    assert bco.intensity_psi is not None and bco.intensity_psi > PSI_WARN and not bco.drifted
    assert bco.median_size == (2000, 1600) and bco.bit_depths == (12,)
    no_reference = watch(Reference(scores=UNIFORM), bright, POINTS)["all"]
    assert no_reference.intensity_psi is None


def _record(url: str, samples: list[Sample], sha256: str) -> None:
    now = dt.datetime.now(dt.UTC)
    with make_sessionmaker(open_database(url)).begin() as s:
        study = Study(study_instance_uid=f"1.3.{len(samples)}", state="processed", first_received_at=now,
                      last_received_at=now, state_changed_at=now)
        s.add(study)
        s.flush()
        series_of: dict[str | None, Series] = {}
        for n, x in enumerate(samples):
            if x.body_part not in series_of:
                series_of[x.body_part] = Series(study_id=study.id, body_part=x.body_part,
                                                series_instance_uid=f"1.3.{len(samples)}.1.{len(series_of)}")
                s.add(series_of[x.body_part])
                s.flush()
            series = series_of[x.body_part]
            inst = received_instance(s, study.id, series.id, f"1.3.{len(samples)}.{n}", now)
            s.add(Prediction(study_id=study.id, instance_id=inst.id, level="image", run=1,
                             probability=x.probability, grade="negative", model_sha256=sha256,
                             image_stats=x.stats.as_dict() if x.stats else None, created_at=now))


def test_shifted_stream_shows_in_the_metric_and_the_log(tmp_path: Path) -> None:
    """Recorded predictions of a brighter, higher-scoring stream: /metrics says drifted, with
    the PSI of the scores and of the intensities per group, and the periodic check warns."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families
    from structlog.testing import capture_logs

    from dicomai.ops.drift import DriftWatch
    from dicomai.ops.metrics import AuditCollector

    pkg = load_package(hot_spot_model(tmp_path / "model"))
    manifest = pkg.manifest.model_copy(update={"reference": Reference(scores=UNIFORM, intensity=INTENSITY)})
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    rng = random.Random(2)
    stream = [Sample(rng.random() ** 0.4, "HAND", x.stats)
              for x in _samples(rng, 150, "Brightco", lambda: 0.9 + 0.05 * rng.random())]
    _record(url, stream, manifest.sha256)
    _record(url, [Sample(0.5, "HAND", None)] * 40, "f" * 64)  # another model's: not counted
    sessions = make_sessionmaker(open_database(url))
    watch_ = DriftWatch(sessions, manifest, POINTS, window_days=30)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuditCollector(sessions, tmp_path, dt.datetime.now(dt.UTC), manifest, watch_))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(generate_latest(registry).decode())
               for s in family.samples}
    assert samples[("dicomai_model_drift_images", (("group", "all"),))] == 150
    assert samples[("dicomai_model_drifted", (("group", "all"),))] == 1
    assert samples[("dicomai_model_drifted", (("group", "manufacturer=BRIGHTCO"),))] == 1
    hand_psi = ("dicomai_model_drift_psi", (("group", "body_part=HAND"), ("statistic", "score")))
    assert samples[hand_psi] > PSI_WARN
    assert ("dicomai_model_drifted", (("group", "body_part=HAND"),)) not in samples  # shown, not judged
    for statistic in ("score", "intensity"):
        assert samples[("dicomai_model_drift_psi", (("group", "all"), ("statistic", statistic)))] > PSI_WARN
    assert samples[("dicomai_model_flagged_rate", (("group", "all"), ("point", "high_sensitivity")))] > 0.85
    with capture_logs() as logs:
        watch_.check()
    (warning,) = [e for e in logs if e["event"] == "model.drift"]
    assert warning["log_level"] == "warning" and set(warning["groups"]) == {"all", "manufacturer=BRIGHTCO"}


def test_the_node_records_each_analysed_image_s_statistics(tmp_path: Path) -> None:
    """Through the node's stage: an analysed CR's prediction row carries its size, bit depth,
    windowed mean and manufacturer; an image out of scope carries none."""
    from sqlalchemy import select

    from tests.helpers import make_study, shared_file
    from tests.test_pipeline import run_stage

    uid, paths = make_study([shared_file("RG2_JPLL.dcm")], tmp_path / "s")
    _, chest = make_study([shared_file("RG2_JPLL.dcm")], tmp_path / "s", study_uid=uid, body_part="CHEST")
    # the test model analyses every body part: the configuration leaves the chest out
    sessions = run_stage(tmp_path, uid, paths + chest, '[scope]\nbody_parts = ["HIP"]\n')
    with sessions() as s:
        rows = {p.grade: p.image_stats
                for p in s.scalars(select(Prediction).where(Prediction.level == "image"))}
    assert rows["not_analysed"] is None
    (stats,) = [v for k, v in rows.items() if k != "not_analysed"]
    src = dcmread(paths[0], stop_before_pixels=True)
    assert (stats["rows"], stats["columns"], stats["bits_stored"]) == (src.Rows, src.Columns, src.BitsStored)
    assert stats["manufacturer"] == "Fuji Photo Film Co.,Ltd." and 0.05 < stats["mean_intensity"] < 0.95


def test_a_body_part_unlike_the_mixed_reference_is_shown_not_warned_on(tmp_path: Path) -> None:
    """Hands score high and feet low, all images together as the reference: each body part's
    group is past the threshold (the reference mixes all regions), the node does not warn,
    as `dicomai model drift` does not."""
    from structlog.testing import capture_logs

    from dicomai.ops.drift import DriftWatch

    pkg = load_package(hot_spot_model(tmp_path / "model"))
    manifest = pkg.manifest.model_copy(update={"reference": Reference(scores=UNIFORM)})
    url = f"sqlite:///{tmp_path / 'audit.sqlite3'}"
    rng = random.Random(3)
    _record(url, [Sample(0.5 + rng.random() / 2, "HAND", None) for _ in range(200)]
            + [Sample(rng.random() / 2, "FOOT", None) for _ in range(200)], pkg.manifest.sha256)
    watch_ = DriftWatch(make_sessionmaker(open_database(url)), manifest, POINTS, window_days=30)
    with capture_logs() as logs:
        groups = watch_.check()
    assert groups["body_part=HAND"].drifted and groups["body_part=FOOT"].drifted
    assert not groups["all"].drifted
    assert not [e for e in logs if e["event"] == "model.drift"]
