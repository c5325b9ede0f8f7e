"""Tests of radiologists' feedback: stored and audited, and the node's PPV/NPV computed from it."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from dicomai.cli import main
from dicomai.model.calibration import confusion, wilson
from dicomai.store import Event, Series, Study, make_sessionmaker, open_database
from dicomai.store.models import Feedback, Prediction

NOW = dt.datetime.now(dt.UTC)


def _shipped_sha256() -> str:
    from dicomai.model.package import load_package
    from dicomai.node import default_model_dir

    directory = default_model_dir()
    assert directory is not None
    return load_package(directory, check_hash=False).manifest.sha256


def _database(data_dir: Path, studies: dict[str, tuple[str, float | None, dt.datetime]],
              other_model: frozenset[str] = frozenset()) -> str:
    """An audit database holding ``studies``: UID -> (grade, probability, received at), graded
    by the shipped model, or by another one for the UIDs in ``other_model``."""
    url = f"sqlite:///{data_dir / 'audit.sqlite3'}"
    maker = make_sessionmaker(open_database(url))
    shipped = _shipped_sha256()
    with maker.begin() as s:
        for n, (uid, (grade, p, at)) in enumerate(studies.items()):
            study = Study(study_instance_uid=uid, state="processed", first_received_at=at,
                          last_received_at=at, state_changed_at=at, grade=grade, probability=p)
            s.add(study)
            s.flush()
            s.add(Series(study_id=study.id, series_instance_uid=f"{uid}.1.{n}", modality="DX",
                         body_part="HAND"))
            s.add(Prediction(study_id=study.id, level="study", run=1, grade=grade, probability=p,
                             model_sha256="0" * 64 if uid in other_model else shipped, created_at=at))
    return url


def test_wilson_matches_the_model_cards_interval() -> None:
    """Wilson's interval as the training code computed it (99 of 109 at the test split)."""
    lo, hi = wilson(99, 109)
    assert lo == pytest.approx(0.8393146396581206, abs=1e-9)
    assert hi == pytest.approx(0.9494025652605222, abs=1e-9)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == pytest.approx(1.0)


def test_feedback_round_trip_computes_ppv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Reads are stored with who and when, audited, and give PPV/NPV at both operating points."""
    old = NOW - dt.timedelta(days=60)
    studies = {
        "1.2.3.1": ("positive", 0.9, NOW),  # read fracture: TP at both points
        "1.2.3.2": ("positive", 0.8, NOW),  # no fracture: FP at both
        "1.2.3.3": ("doubtful", 0.3, NOW),  # fracture: TP at high sensitivity, FN at high specificity
        "1.2.3.4": ("doubtful", 0.2, NOW),  # other finding: FP at high sensitivity, TN at high spec.
        "1.2.3.5": ("negative", 0.01, NOW),  # no fracture: TN at both
        "1.2.3.6": ("negative", 0.02, old),  # fracture, but before --since
        "1.2.3.7": ("not_analysed", None, NOW),  # no grade to judge
        "1.2.3.8": ("negative", 0.1, NOW),  # fracture, graded by the model before an upgrade
    }
    url = _database(tmp_path, studies, other_model=frozenset({"1.2.3.8"}))
    reads = {"1.2.3.1": "fracture", "1.2.3.2": "no_fracture", "1.2.3.3": "fracture",
             "1.2.3.4": "other", "1.2.3.5": "fracture", "1.2.3.6": "fracture", "1.2.3.7": "fracture",
             "1.2.3.8": "fracture"}
    for uid, read in reads.items():
        assert main(["--data-dir", str(tmp_path), "feedback", uid, "--read", read, "--by", "dr-a"]) == 0
    # a later read supersedes the first: 1.2.3.5 was no fracture after all
    assert main(["--data-dir", str(tmp_path), "feedback", "1.2.3.5", "--read", "no_fracture",
                 "--by", "dr-b", "--note", "re-read"]) == 0
    assert main(["--data-dir", str(tmp_path), "feedback", "9.9.9", "--read", "fracture"]) == 1
    assert "no study 9.9.9" in capsys.readouterr().err

    with make_sessionmaker(open_database(url, create=False))() as s:
        rows = s.scalars(select(Feedback).order_by(Feedback.id)).all()
        events = s.scalars(select(Event).where(Event.event == "feedback.recorded")).all()
    assert len(rows) == 9 and rows[-1].read_by == "dr-b" and rows[-1].note == "re-read"
    assert all(r.recorded_at >= NOW for r in rows)
    assert len(events) == 9 and events[0].details == {"read": "fracture", "by": "dr-a",
                                                      "model_grade": "positive"}

    assert main(["--data-dir", str(tmp_path), "model", "performance", "--since", "30d", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["studies"] == 5 and out["fractured"] == 2
    assert out["other_model_studies"] == 1  # its grade says nothing of the model in use
    hs, hp = out["high_sensitivity"], out["high_specificity"]
    assert (hs["tp"], hs["fp"], hs["tn"], hs["fn"]) == (2, 2, 1, 0)
    assert (hp["tp"], hp["fp"], hp["tn"], hp["fn"]) == (1, 1, 2, 1)
    assert hs["ppv"]["value"] == pytest.approx(0.5) and hp["ppv"]["value"] == pytest.approx(0.5)
    assert hs["npv"]["value"] == pytest.approx(1.0) and hp["npv"]["value"] == pytest.approx(2 / 3)
    assert hs["sensitivity"]["ci95"] == pytest.approx(list(wilson(2, 2)))

    assert main(["--data-dir", str(tmp_path), "model", "performance"]) == 0
    text = capsys.readouterr().out
    assert "studies with a final read: 6 (3 fractured)" in text
    assert "1 read study graded by another model left out" in text
    assert "PPV" in text and "doubtful or positive (>= high-sensitivity threshold)" in text


def test_confusion_counts() -> None:
    """Counts of a decision against the truth, and the rates derived from them."""
    c = confusion([True, True, False, False], [True, False, True, False])
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 1, 1, 1)
    assert c.ppv.value == 0.5 and c.npv.value == 0.5
    assert confusion([], []).ppv.value is None


def test_who_is_the_person_behind_sudo(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as the service user through sudo (as the README says), a read or a calibration is
    recorded as the person who ran sudo, not as the service account."""
    import getpass

    from dicomai.cli.feedback import current_user

    monkeypatch.setenv("SUDO_USER", "dr-a")
    assert current_user() == "dr-a"
    monkeypatch.delenv("SUDO_USER")
    assert current_user() == getpass.getuser()
