"""Tests of the start-up check that the audit database belongs to the spool, and the orphan sweep."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.net.dimse import encode_header, parse_instance
from dicomai.store import make_sessionmaker, open_database
from dicomai.store.integrity import MARKER, StoreMismatchError, Sweep, check_store
from dicomai.store.models import Instance, Quarantined
from dicomai.store.spool import Spool
from tests.helpers import Node, dataset_bytes, make_study, shared_file, storescu


def _spool_copy(spool: Spool, path: Path) -> Path:
    """Put a Part 10 file in the spool where the listener would have (no database row)."""
    from pydicom.filereader import read_file_meta_info

    meta = read_file_meta_info(path)
    data = dataset_bytes(path)
    raw = encode_header(meta) + data
    info = parse_instance(raw, str(meta.TransferSyntaxUID), None)
    return spool.write_instance(info.study_instance_uid, info.sop_instance_uid,
                                hashlib.sha256(data).hexdigest(), [raw])


def _open(tmp_path: Path, name: str) -> tuple[Spool, sessionmaker[Session]]:
    spool = Spool(tmp_path / name, fsync=False)
    spool.prepare()
    return spool, make_sessionmaker(open_database(f"sqlite:///{tmp_path / f'{name}.sqlite3'}"))


def test_orphans_registered_or_quarantined(tmp_path: Path) -> None:
    """A readable spool file without a row is registered (its study too); an unreadable one is
    quarantined and recorded; a second start finds nothing to do."""
    spool, sessions = _open(tmp_path, "a")
    _, (good,) = make_study([shared_file("dx_image.dcm")], tmp_path / "s")
    kept = _spool_copy(spool, good)
    junk = spool.spool_dir / "1.2.3" / "1.2.3.4.0123456789abcdef.dcm"
    spool.write_file(junk, [b"\0" * 128 + b"DICM" + b"not a data set"])
    assert check_store(spool, sessions, "sqlite://a", parse_instance) == Sweep(1, 1)
    with sessions() as s:
        (row,) = s.scalars(select(Instance)).all()
        assert row.spool_path == str(kept.relative_to(spool.root)) and row.association_id is None
        (q,) = s.scalars(select(Quarantined)).all()
        assert q.reason.startswith("orphan spool file")
    assert not junk.exists() and (spool.root / q.path).exists()
    assert check_store(spool, sessions, "sqlite://a", parse_instance) == Sweep()


def test_foreign_or_missing_database_refused(tmp_path: Path) -> None:
    """A database bound to another data directory, or one that does not know a non-empty
    spool, stops the start with the command that adopts the spool; after it, the start goes on."""
    a, a_sessions = _open(tmp_path, "a")
    b, b_sessions = _open(tmp_path, "b")
    assert check_store(a, a_sessions, "db-a", parse_instance) == Sweep()
    assert check_store(b, b_sessions, "db-b", parse_instance) == Sweep()
    _, (good,) = make_study([shared_file("dx_image.dcm")], tmp_path / "s")
    _spool_copy(b, good)
    with pytest.raises(StoreMismatchError, match="belongs to another data directory") as err:
        check_store(b, a_sessions, "db-a", parse_instance)
    assert err.value.exit_code == 3 and f"rm {b.root / MARKER}" in str(err.value)
    _, fresh = _open(tmp_path, "fresh")
    with pytest.raises(StoreMismatchError, match="no record of this data directory"):
        check_store(b, fresh, "db-fresh", parse_instance)
    (b.root / MARKER).unlink()  # the command the error names
    assert check_store(b, fresh, "db-fresh", parse_instance) == Sweep(1, 0)


@pytest.mark.integration
def test_deleted_sqlite_refuses_start(node_factory: type[Node], tmp_path: Path) -> None:
    """With its SQLite database deleted the node refuses to start (exit 3) and says how to
    adopt the spool; after that command the spooled instances are registered again."""
    node = node_factory(data_dir=tmp_path / "data").start()
    study_uid, files = make_study([shared_file("dx_image.dcm")] * 2, tmp_path / "s")
    assert storescu(node.port, files).returncode == 0
    assert node.stop() == 0
    for path in node.data_dir.glob("audit.sqlite3*"):
        path.unlink()
    node.start(wait=False)
    assert node.proc is not None
    assert node.proc.wait(timeout=60) == 3
    assert f"rm {node.data_dir / MARKER}" in node.log()
    (node.data_dir / MARKER).unlink()
    node.start()
    study = node.wait_state(study_uid, "processed")
    assert len(study["instances"]) == 2
    assert node.stop() == 0
    db = sqlite3.connect(node.data_dir / "audit.sqlite3")
    assert db.execute("select count(*) from events where event='instance.recovered'").fetchone() == (2,)
    shutil.rmtree(tmp_path / "s")
