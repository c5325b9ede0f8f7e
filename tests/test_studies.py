"""Tests of study stability, re-opening and recovery (real database, fake clock)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.store import (
    Association,
    Event,
    Instance,
    InstanceState,
    Series,
    Study,
    StudyState,
    make_sessionmaker,
    open_database,
)
from dicomai.studies import StudyMonitor, StudyWork, instance_arrived

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def sessions(db_url: str) -> sessionmaker[Session]:
    return make_sessionmaker(open_database(db_url))


def add_instance(sessions: sessionmaker[Session], study_uid: str, sop: str, at: dt.datetime,
                 association: int | None = None) -> None:
    """What ingest does for one stored instance (study row, series row, instance row)."""
    with sessions.begin() as s:
        study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        if study is None:
            study = Study(study_instance_uid=study_uid, state=StudyState.RECEIVING,
                          first_received_at=at, last_received_at=at, state_changed_at=at,
                          reopen_count=0)
            s.add(study)
            s.flush()
            s.add(Series(study_id=study.id, series_instance_uid=study_uid + ".1"))
            s.flush()
        else:
            instance_arrived(s, study, at, association)
        series = s.scalar(select(Series).where(Series.study_id == study.id))
        assert series is not None
        s.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=sop,
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                       version=1, size_bytes=1, sha256="0" * 64, spool_path=f"spool/{sop}.dcm",
                       state=InstanceState.STORED, received_at=at, association_id=association))


def state(sessions: sessionmaker[Session], uid: str) -> str:
    with sessions() as s:
        return s.scalars(select(Study.state).where(Study.study_instance_uid == uid)).one()


def test_stable_only_after_quiet_period(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """A study is handed on once, after the quiet period, with all its instances."""
    clock, seen = Clock(), []
    mon = StudyMonitor(sessions, tmp_path, 10, seen.append, clock)
    add_instance(sessions, "1.1", "1.1.1", T0)
    add_instance(sessions, "1.1", "1.1.2", T0 + dt.timedelta(seconds=5))
    clock.now = T0 + dt.timedelta(seconds=14)
    assert mon.poll() == 0 and state(sessions, "1.1") == "receiving"
    clock.now = T0 + dt.timedelta(seconds=15)
    assert mon.poll() == 1
    assert [i.sop_instance_uid for i in seen[0].instances] == ["1.1.1", "1.1.2"]
    assert seen[0].instances[0].path == tmp_path / "spool/1.1.1.dcm"
    assert state(sessions, "1.1") == "processed"
    assert mon.poll() == 0


def test_late_instance_reopens_and_only_new_are_handed_on(sessions: sessionmaker[Session],
                                                         tmp_path: Path) -> None:
    """A late instance re-opens a processed study; the next stage gets just the new one."""
    clock, seen = Clock(), []
    mon = StudyMonitor(sessions, tmp_path, 10, seen.append, clock)
    add_instance(sessions, "2.1", "2.1.1", T0)
    clock.now = T0 + dt.timedelta(seconds=11)
    mon.poll()
    add_instance(sessions, "2.1", "2.1.2", clock.now)
    assert state(sessions, "2.1") == "receiving"
    clock.now += dt.timedelta(seconds=11)
    assert mon.poll() == 1
    assert [i.sop_instance_uid for i in seen[1].instances] == ["2.1.2"]
    assert seen[1].reopen_count == 1


def test_instance_during_processing_is_not_lost(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """An instance that arrives while the hook runs leaves the study open for another pass."""
    clock = Clock()
    calls: list[StudyWork] = []

    def hook(work: StudyWork) -> None:
        calls.append(work)
        if len(calls) == 1:
            add_instance(sessions, "3.1", "3.1.2", clock.now)

    mon = StudyMonitor(sessions, tmp_path, 10, hook, clock)
    add_instance(sessions, "3.1", "3.1.1", T0)
    clock.now = T0 + dt.timedelta(seconds=11)
    mon.poll()
    assert state(sessions, "3.1") == "receiving"
    clock.now += dt.timedelta(seconds=11)
    mon.poll()
    assert [i.sop_instance_uid for i in calls[1].instances] == ["3.1.2"]
    assert state(sessions, "3.1") == "processed"


def test_failing_hook_marks_failed_and_goes_on(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """A next stage that raises marks its study failed with the error; others still run."""
    clock = Clock()

    def hook(work: StudyWork) -> None:
        if work.study_instance_uid == "4.1":
            raise RuntimeError("model exploded")

    mon = StudyMonitor(sessions, tmp_path, 1, hook, clock)
    add_instance(sessions, "4.1", "4.1.1", T0)
    add_instance(sessions, "4.2", "4.2.1", T0)
    clock.now = T0 + dt.timedelta(seconds=2)
    assert mon.poll() == 2
    assert (state(sessions, "4.1"), state(sessions, "4.2")) == ("failed", "processed")
    with sessions() as s:
        err = s.scalars(select(Event.error).where(Event.event == "study.failed")).one()
    assert err is not None and "model exploded" in err


def test_recover_requeues_in_flight(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """After a crash, studies left processing (or with unprocessed instances) are re-queued."""
    clock, seen = Clock(), []
    add_instance(sessions, "5.1", "5.1.1", T0)
    with sessions.begin() as s:
        s.scalars(select(Study)).one().state = StudyState.PROCESSING
    mon = StudyMonitor(sessions, tmp_path, 1, seen.append, clock)
    assert mon.recover() == 1
    clock.now = T0 + dt.timedelta(seconds=2)
    assert mon.poll() == 1 and state(sessions, "5.1") == "processed"


def _association(sessions: sessionmaker[Session], at: dt.datetime) -> int:
    with sessions.begin() as s:
        row = Association(peer_host="127.0.0.1", peer_port=1, calling_ae="PACS", called_ae="DICOMAI",
                          accepted=True, started_at=at, instances=0, bytes_received=0, failures=0)
        s.add(row)
        s.flush()
        return row.id


def _release(sessions: sessionmaker[Session], association: int, at: dt.datetime) -> None:
    with sessions.begin() as s:
        row = s.get_one(Association, association)
        row.ended_at, row.end_state = at, "released"


def test_stable_early_once_every_sending_association_is_released(sessions: sessionmaker[Session],
                                                                  tmp_path: Path) -> None:
    """With a settle delay, a study is handed on once the associations that brought its
    instances are released and the delay has passed, long before the quiet period; while one
    of them is still open, the quiet period rules."""
    clock = Clock()
    seen: list[StudyWork] = []
    mon = StudyMonitor(sessions, tmp_path, 10, seen.append, clock, settle_s=1.0)
    a, b = _association(sessions, T0), _association(sessions, T0)
    add_instance(sessions, "1.2.9", "1.2.9.1", T0, association=a)
    add_instance(sessions, "1.2.9", "1.2.9.2", T0, association=b)
    _release(sessions, a, T0)
    clock.now = T0 + dt.timedelta(seconds=2)
    assert mon.poll() == 0  # b is still open
    _release(sessions, b, clock.now)
    assert StudyMonitor(sessions, tmp_path, 10, seen.append, clock).poll() == 0  # no settle: quiet period
    assert mon.poll() == 1 and [len(w.instances) for w in seen] == [2]
    assert state(sessions, "1.2.9") == StudyState.PROCESSED
    with sessions() as s:
        (stable,) = s.scalars(select(Event).where(Event.event == "study.stable")).all()
    assert stable.details is not None and stable.details["rule"] == "associations released"
