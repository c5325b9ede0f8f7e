"""Retention: files of finished studies purged by age and under disk pressure; rows kept.

The selection rules run on seeded rows and files (SQLite and PostgreSQL); the node's
scheduled purge on a real tmpfs that fills up, a purge after delivery to a real Orthanc, and
a purge killed with SIGKILL midway run against real processes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.config import DatabaseConfig, Destination, NodeConfig, RetentionConfig, Settings
from dicomai.deliver.outbox import Sender
from dicomai.ops.retention import purge
from dicomai.store import make_sessionmaker, open_database
from dicomai.store.models import (
    Event,
    Instance,
    OutboxItem,
    Prediction,
    Quarantined,
    ResultObject,
    Series,
    Study,
    utcnow,
)
from tests.helpers import Node, Orthanc, free_port, make_study, mounted_tmpfs, pydicom_data, storescu
from tests.test_delivery import _config, _wait
from tests.test_ingest import _send_file

NOW = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
MiB = 2**20


def _settings(root: Path, db_url: str, **retention: Any) -> Settings:
    return Settings(node=NodeConfig(data_dir=root), database=DatabaseConfig(url=db_url),
                    retention=RetentionConfig(**retention),
                    destinations=[Destination(name="pacs", ae_title="PACS", host="127.0.0.1",
                                              port=free_port())])


@pytest.fixture
def store(tmp_path: Path, db_url: str) -> Iterator[tuple[Path, sessionmaker[Session], str]]:
    engine = open_database(db_url)
    yield tmp_path / "data", make_sessionmaker(engine), db_url
    engine.dispose()


def _write(root: Path, rel: str, size: int) -> str:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * size)
    return rel


def _seed(sessions: sessionmaker[Session], root: Path, days_ago: float, *, state: str = "processed",
          outbox: str | None = None, size: int = 1000) -> str:
    """A study with one instance, one SC and one Grad-CAM map on disk, finished ``days_ago``
    (``outbox``: the state of the SC's one delivery row, none when None)."""
    uid, sop, sc_uid = generate_uid(), generate_uid(), generate_uid()
    at = NOW - dt.timedelta(days=days_ago)
    finished = state in ("processed", "failed")
    with sessions.begin() as s:
        study = Study(study_instance_uid=uid, state=state, first_received_at=at, last_received_at=at,
                      state_changed_at=at, processed_at=at if finished else None, reopen_count=0)
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=generate_uid(), modality="CR")
        s.add(series)
        s.flush()
        inst = Instance(study_id=study.id, series_id=series.id, sop_instance_uid=sop,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                        version=1, size_bytes=size, sha256="0" * 64,
                        spool_path=_write(root, f"spool/{uid}/{sop}.0000000000000000.dcm", size),
                        state="processed" if finished else "stored", received_at=at)
        s.add(inst)
        s.flush()
        sc = ResultObject(study_id=study.id, kind="sc", run=0, sop_instance_uid=sc_uid,
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.7", series_instance_uid=generate_uid(),
                          source_instance_id=inst.id, grade="negative", size_bytes=size, shadow=False,
                          path=_write(root, f"results/{uid}/{sc_uid}.sc.dcm", size), created_at=at)
        s.add(sc)
        s.add(Prediction(study_id=study.id, instance_id=inst.id, sop_instance_uid=sop, level="image", run=0,
                         grade="negative", created_at=at,
                         gradcam_path=_write(root, f"results/{uid}/{sop}.gradcam.npz", size)))
        s.flush()
        if outbox is not None:
            s.add(OutboxItem(result_id=sc.id, destination="pacs", state=outbox, attempts=1, created_at=at,
                             next_attempt_at=NOW + dt.timedelta(hours=1) if outbox == "pending" else at,
                             expires_at=NOW + dt.timedelta(days=1), last_attempt_at=at,
                             sent_at=at if outbox == "sent" else None))
    return uid


def _quarantine(sessions: sessionmaker[Session], root: Path, days_ago: float) -> str:
    rel = _write(root, f"quarantine/{generate_uid()}.dcm", 100)
    _write(root, rel.replace(".dcm", ".json"), 10)
    with sessions.begin() as s:
        s.add(Quarantined(received_at=NOW - dt.timedelta(days=days_ago), path=rel, status=0xC210,
                          reason="test", size_bytes=100, sha256="0" * 64))
    return rel


def _rows(sessions: sessionmaker[Session], uid: str) -> list[tuple[str, str, dt.datetime | None, str | None]]:
    """(kind, path, purged_at, reason) of every file row of the study."""
    with sessions() as s:
        study = s.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        out = [("instance", i.spool_path, i.purged_at, i.purge_reason)
               for i in s.scalars(select(Instance).where(Instance.study_id == study.id))]
        out += [("result", r.path or "", r.purged_at, r.purge_reason)
                for r in s.scalars(select(ResultObject).where(ResultObject.study_id == study.id))]
        out += [("map", p.gradcam_path or "", p.gradcam_purged_at, p.gradcam_purge_reason)
                for p in s.scalars(select(Prediction).where(Prediction.study_id == study.id))]
    return out


def _purged(sessions: sessionmaker[Session], root: Path, uid: str) -> bool:
    """Every file of the study gone and its row saying so (False: every file still there)."""
    rows = _rows(sessions, uid)
    gone = [not (root / path).exists() and at is not None and bool(why) for _, path, at, why in rows]
    kept = [(root / path).exists() and at is None for _, path, at, _ in rows]
    assert all(gone) or all(kept), rows
    return all(gone)


def test_age_purge_of_finished_studies_only(store: tuple[Path, sessionmaker[Session], str]) -> None:
    """Past retention, a finished study's files go (rows kept and marked); a study still in the
    outbox, one being received, and one finished recently keep theirs; dry run deletes nothing."""
    root, sessions, url = store
    delivered = _seed(sessions, root, 40, outbox="sent")
    kept_mode = _seed(sessions, root, 40)  # shadow / keep: no outbox row
    dead = _seed(sessions, root, 40, outbox="dead", state="failed")
    pending = _seed(sessions, root, 40, outbox="pending")
    receiving = _seed(sessions, root, 40, state="receiving")
    recent = _seed(sessions, root, 10, outbox="sent")
    old_q, new_q = _quarantine(sessions, root, 40), _quarantine(sessions, root, 1)
    settings = _settings(root, url, maps_days=0)  # maps kept forever

    dry = purge(settings, sessions, now=NOW, dry_run=True)
    assert sorted((d.file.kind.value, d.file.study_instance_uid) for d in dry.files) == sorted(
        [(k, u) for u in (delivered, kept_mode, dead) for k in ("instance", "result")]
        + [("quarantine", None)])
    assert all((root / d.file.path).exists() for d in dry.files)

    report = purge(settings, sessions, now=NOW)
    assert len(report.files) == 7 and not report.leftovers
    for uid in (delivered, kept_mode, dead):
        rows = {kind: (at, why) for kind, _, at, why in _rows(sessions, uid)}
        assert rows["instance"][1] == "kept 30 days after completion (retention.instances_days)"
        assert rows["result"][0] is not None and rows["map"] == (None, None)
        assert not (root / "spool" / uid).exists() or not any((root / "spool" / uid).iterdir())
    for uid in (pending, receiving, recent):
        assert not _purged(sessions, root, uid)
    assert not (root / old_q).exists() and not (root / old_q.replace(".dcm", ".json")).exists()
    assert (root / new_q).exists()
    with sessions() as s:
        events = s.execute(select(Event.event, Event.study_instance_uid).where(Event.stage == "retention")
                           .order_by(Event.id)).all()
    assert {uid for event, uid in events if event == "study.purged"} == {delivered, kept_mode, dead}
    assert [e for e, _ in events][-2:] == ["quarantine.purged", "retention.purged"]
    assert purge(settings, sessions, now=NOW).files == []  # nothing twice


def test_disk_pressure_purges_oldest_finished_first(store: tuple[Path, sessionmaker[Session], str]) -> None:
    """Above the high watermark, finished studies go oldest first, whatever their age, until
    below the low one; a study waiting for delivery is never touched (injected disk usage)."""
    root, sessions, url = store
    oldest, middle, newest = (_seed(sessions, root, d, outbox="sent", size=MiB) for d in (3, 2, 1))
    waiting = _seed(sessions, root, 4, outbox="pending", size=MiB)
    total = 100 * MiB

    def usage(_: Path) -> tuple[int, int]:  # 80 MiB of other data plus the studies' files
        return 80 * MiB + sum(p.stat().st_size for p in root.rglob("*") if p.is_file()), total

    settings = _settings(root, url, high_watermark_pct=90, low_watermark_pct=87)
    assert usage(root)[0] == 92 * MiB  # 3 MiB per study
    dry = purge(settings, sessions, now=NOW, usage=usage, dry_run=True)
    assert {d.file.study_instance_uid for d in dry.files} == {oldest, middle}
    assert dry.pressure and dry.used_pct_after == 86.0 and not dry.unrelieved
    report = purge(settings, sessions, now=NOW, usage=usage)
    assert report.pressure and report.used_pct == 92.0
    purged = [_purged(sessions, root, u) for u in (oldest, middle, newest, waiting)]
    assert purged == [True, True, False, False]
    assert report.used_pct_after == 86.0 and not report.unrelieved
    assert "above retention.high_watermark_pct 90" in report.files[0].reason
    again = purge(_settings(root, url, high_watermark_pct=50, low_watermark_pct=40), sessions, now=NOW,
                  usage=usage)
    assert again.unrelieved and _purged(sessions, root, newest) and not _purged(sessions, root, waiting)


def test_outbox_never_sends_a_purged_result(store: tuple[Path, sessionmaker[Session], str]) -> None:
    """A result purged while a delivery of it is pending (an admin's retry) is settled dead."""
    root, sessions, url = store
    uid = _seed(sessions, root, 40, outbox="sent")
    purge(_settings(root, url), sessions, now=NOW)
    with sessions.begin() as s:
        row = s.scalars(select(OutboxItem)).one()
        row.state, row.next_attempt_at = "pending", utcnow()
        row.expires_at = utcnow() + dt.timedelta(days=1)
    assert Sender(_settings(root, url), sessions).run_once() == 0  # nothing sent
    with sessions() as s:
        row = s.scalars(select(OutboxItem)).one()
        assert (row.state, row.last_error, row.attempts) == ("dead", "result file purged", 1)
        events = s.scalars(select(Event.event).where(Event.study_instance_uid == uid)).all()
        assert events[-1] == "outbox.dead"


_KILLED_PURGE = textwrap.dedent("""
    import os, signal, sys, datetime as dt
    from dicomai.config import load_settings
    from dicomai.ops.retention import purge
    from dicomai.store import make_sessionmaker, open_database

    settings = load_settings(environ=os.environ)
    removed = []

    def remove(path):
        path.unlink(missing_ok=True)
        removed.append(path)
        if len(removed) == 2:  # the rows of this batch are committed, one file is left
            os.kill(os.getpid(), signal.SIGKILL)

    purge(settings, make_sessionmaker(open_database(settings.database_url)),
          now=dt.datetime.fromisoformat(sys.argv[1]), remove=remove)
""")


def test_purge_killed_midway_is_consistent(store: tuple[Path, sessionmaker[Session], str]) -> None:
    """kill -9 after a purge marked its rows and deleted some files: every missing file's row
    says purged; the next run (a new process) deletes the files the killed one left."""
    root, sessions, url = store
    uids = [_seed(sessions, root, 40, outbox="sent") for _ in range(3)]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DICOMAI_")},
           "DICOMAI_NODE__DATA_DIR": str(root), "DICOMAI_DATABASE__URL": url}
    killed = subprocess.run([sys.executable, "-c", _KILLED_PURGE, NOW.isoformat()], env=env,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    rows = [r for u in uids for r in _rows(sessions, u)]
    assert all(at is not None for _, path, at, _ in rows if not (root / path).exists())
    left = [path for _, path, at, _ in rows if at is not None and (root / path).exists()]
    assert len(left) == 1  # marked, not deleted yet
    with sessions() as s:
        assert s.scalar(select(Event.id).where(Event.event == "retention.purged")) is None

    # Restart: a new process (`dicomai purge`, as the node's first scheduled run would).
    out = subprocess.run([sys.executable, "-m", "dicomai", "purge", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [f["path"] for f in report["leftovers"]] == left
    assert all(_purged(sessions, root, u) for u in uids)


# -- the node -------------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 128 MiB tmpfs: a disk that really fills."""
    with mounted_tmpfs(tmp_path / "tmpfs", 128) as mount:
        yield mount


def _hand_study(out_dir: Path) -> tuple[str, list[Path]]:
    """A one-image CR study in the model's scope (pydicom's RG3 says EXTREMITY; made a HAND)."""
    uid, files = make_study([pydicom_data("RG3_UNCR.dcm")], out_dir)
    for f in files:
        ds = dcmread(f)
        ds.BodyPartExamined = "HAND"
        ds.save_as(f, enforce_file_format=True)
    return uid, files


def _made(node: Node, uid: str) -> dict[str, Any] | None:
    study = node.study(uid)
    done = study["state"] == "processed" and study["results"] and all(r["path"] for r in study["results"])
    return study if done else None


@pytest.mark.integration
def test_disk_pressure_on_tmpfs_node_goes_on_accepting(node_factory: type[Node], tmpfs: Path,
                                                       tmp_path: Path) -> None:
    """A tmpfs data dir filled past the high watermark: the node's scheduled purge deletes the
    oldest finished study (only it: below the low watermark then) and a C-STORE that the disk
    floor would have refused succeeds."""
    # Uncompressed SCs: a study then takes about 16 MB (the 6.2 MB radiograph, a 10 MB SC; 1.2 MB
    # in JPEG-LS), enough on this disk for one purge to go from above the high watermark to
    # below the low one.
    node = node_factory(data_dir=tmpfs, env_extra={
        "DICOMAI_STORAGE__MIN_FREE_MB": "16", "DICOMAI_RETENTION__HIGH_WATERMARK_PCT": "85",
        "DICOMAI_RETENTION__LOW_WATERMARK_PCT": "82", "DICOMAI_RETENTION__INTERVAL_MIN": "0.02",
        "DICOMAI_RESULTS__SC_COMPRESS": "false"}).start()
    uids = []
    for n in range(2):
        uid, files = _hand_study(tmp_path / f"s{n}")
        assert storescu(node.port, files).returncode == 0
        _wait(lambda uid=uid: _made(node, uid), 90, f"study {n} processed with its results")
        uids.append(uid)
    stat = os.statvfs(tmpfs)
    with open(tmpfs / "ballast", "wb") as fh:  # leaves 12 MiB: below the 16 MiB floor
        fh.truncate(stat.f_bavail * stat.f_frsize - 12 * MiB)
        os.posix_fallocate(fh.fileno(), 0, stat.f_bavail * stat.f_frsize - 12 * MiB)
    first = _wait(lambda: (lambda s: s if all(i["purged_at"] for i in s["instances"]) else None)(
        node.study(uids[0])), 30, "the oldest study purged")
    assert "above retention.high_watermark_pct 85" in first["instances"][0]["purge_reason"]
    assert all(r["purged_at"] for r in first["results"])
    assert all(p["gradcam_purged_at"] for p in first["predictions"] if p["level"] == "image")
    assert not any(i["purged_at"] for i in node.study(uids[1])["instances"])
    assert not list((tmpfs / "spool" / uids[0]).glob("*.dcm"))
    _, late = _hand_study(tmp_path / "late")
    assert _send_file(node.port, late[0]) == 0x0000
    assert node.stop() == 0


@pytest.mark.integration
def test_delivered_study_purged_pending_one_kept(node_factory: type[Node], tmp_path: Path) -> None:
    """A study delivered to Orthanc is purged once past retention (`dicomai purge`; `studies
    show` says so); a study whose results still wait in the outbox is not, however old."""
    orthanc = Orthanc(tmp_path / "orthanc", {})
    node = node_factory(data_dir=tmp_path / "data", config=_config(tmp_path / "n.toml", orthanc.dicom_port))
    orthanc.start()
    try:
        node.start()
        delivered, files = _hand_study(tmp_path / "a")
        assert storescu(node.port, files).returncode == 0
        _wait(lambda: (lambda s: s if s["state"] == "processed" and s["results"] and all(
            d["state"] == "sent" for r in s["results"] for d in r["deliveries"]) else None)(
            node.study(delivered)), 90, "the first study delivered")
    finally:
        orthanc.stop()
    waiting, files = _hand_study(tmp_path / "b")
    assert storescu(node.port, files).returncode == 0
    _wait(lambda: (lambda s: s if s["state"] == "processed" and s["results"] and all(
        d["state"] == "pending" and d["attempts"] for r in s["results"] for d in r["deliveries"]) else None)(
        node.study(waiting)), 90, "the second study's deliveries retried")
    past = (utcnow() - dt.timedelta(days=40)).strftime("%Y-%m-%d %H:%M:%S.%f")
    with sqlite3.connect(node.data_dir / "audit.sqlite3", timeout=30) as db:
        db.execute("UPDATE studies SET processed_at = ?", (past,))
        db.execute("UPDATE outbox SET sent_at = ? WHERE sent_at IS NOT NULL", (past,))
        db.execute("UPDATE outbox SET last_attempt_at = ?, created_at = ?", (past, past))

    dry = json.loads(node.cli("purge", "--dry-run", "--json").stdout)
    assert {f["study_instance_uid"] for f in dry["files"]} == {delivered}
    report = json.loads(node.cli("purge", "--json").stdout)
    assert sorted(f["path"] for f in report["files"]) == sorted(f["path"] for f in dry["files"])
    assert {f["kind"] for f in report["files"]} >= {"instance", "result"}
    study = node.study(delivered)
    for i in study["instances"]:
        assert i["purged_at"] and "retention.instances_days" in i["purge_reason"]
        assert not (node.data_dir / i["spool_path"]).exists()
    assert all(r["purged_at"] and not (node.data_dir / r["path"]).exists() for r in study["results"])
    assert "study.purged" in [e["event"] for e in study["events"]]
    assert "purged_at" in node.cli("studies", "show", delivered).stdout
    other = node.study(waiting)
    assert not any(i["purged_at"] for i in other["instances"])
    assert all((node.data_dir / i["spool_path"]).exists() for i in other["instances"])
    assert all((node.data_dir / r["path"]).exists() for r in other["results"])
