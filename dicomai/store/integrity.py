"""Start-up checks that the audit database and the spool belong together, and the orphan sweep.

A data directory and its audit database are bound by a store id: a random id kept in the
file ``store-id`` of the data directory and in a ``store.bound`` event of the database's
append-only event log. At start (:func:`check_store`):

============================  ============================  =========================================
``store-id`` file             database's ``store.bound``    what happens
============================  ============================  =========================================
present                       the same id                   start
present                       none, spool empty             bind the database (nothing to lose)
present                       none, spool not empty         refuse: database deleted or replaced
present                       another id                    refuse: another node's database
absent                        none                          bind (first start, or asked to adopt)
absent                        an id                         take that id (asked to adopt)
============================  ============================  =========================================

A refusal (:class:`StoreMismatchError`, exit code 3) says how to fix it: restore the database
or point ``database.url`` at the right one, or remove ``store-id`` to adopt the spool into the
database given. Then :func:`sweep_orphans` registers every spool file that no instance row
names (a database lost or replaced, a commit that failed after the spool write) or, when it
cannot be read back, quarantines it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom.filereader import read_file_meta_info
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.errors import DatabaseError, IngestError
from dicomai.store.events import record_event
from dicomai.store.ingest import (
    Outcome,
    Received,
    ReceivedInstance,
    quarantined,
    record_instance,
)
from dicomai.store.models import Event, Instance, utcnow
from dicomai.store.spool import Spool

__all__ = ["MARKER", "Parse", "StoreMismatchError", "Sweep", "check_store", "sweep_orphans"]

log = structlog.get_logger("dicomai.store.integrity")

#: The data directory's file holding its store id.
MARKER = "store-id"
_BOUND = "store.bound"
_STAGE = "node"
#: Parses a Part 10 stream as the listener does (:func:`dicomai.net.dimse.parse_instance`).
Parse = Callable[[bytes, str, str | None], ReceivedInstance]


class StoreMismatchError(DatabaseError):
    """The audit database is not the one the data directory's spool was recorded in.

    Attributes
    ----------
    data_dir, url:
        The data directory and the (password-masked) database URL.
    spool_files:
        How many files the spool holds.
    """

    def __init__(self, data_dir: Path, url: str, problem: str, spool_files: int) -> None:
        marker = data_dir / MARKER
        super().__init__(
            f"{problem}. The spool of {data_dir} holds {spool_files} file(s) recorded in another "
            f"database. Restore that database (or point database.url at it); or, to register "
            f"the spool's files in {url} instead, run: rm {marker} (then start the node again)"
        )
        self.data_dir = data_dir
        self.url = url
        self.spool_files = spool_files


@dataclass(frozen=True)
class Sweep:
    """What :func:`sweep_orphans` did with the spool files no instance row named."""

    registered: int = 0
    quarantined: int = 0


def check_store(spool: Spool, sessions: sessionmaker[Session], url: str, parse: Parse) -> Sweep:
    """Refuse a missing or foreign database next to a non-empty spool; then sweep orphans.

    Raises
    ------
    StoreMismatchError
        When the database does not belong to the data directory (see the module docstring).
    """
    marker = spool.root / MARKER
    ours = marker.read_text().strip() if marker.exists() else None
    with sessions() as s:
        theirs = s.scalar(select(Event.details).where(Event.event == _BOUND)
                          .order_by(Event.id.desc()).limit(1))
    bound = str(theirs.get("store_id")) if isinstance(theirs, dict) else None
    if ours is not None and bound != ours:
        files = _count(spool)
        if bound is not None:
            raise StoreMismatchError(spool.root, url, f"the audit database {url} belongs to another "
                                     f"data directory (store id {bound}, this one has {ours})", files)
        if files:
            raise StoreMismatchError(spool.root, url, f"the audit database {url} has no record of "
                                     f"this data directory (store id {ours}): deleted or replaced?",
                                     files)
    if bound is None:
        store_id = ours or uuid.uuid4().hex
        with sessions.begin() as s:
            record_event(s, _STAGE, _BOUND, details={"store_id": store_id,
                                                      "data_dir": str(spool.root)})
        log.info("store.bound", store_id=store_id, data_dir=str(spool.root))
    else:
        store_id = bound
    if ours != store_id:
        spool.write_file(marker, [f"{store_id}\n".encode()])
    return sweep_orphans(spool, sessions, parse)


def _count(spool: Spool) -> int:
    return sum(1 for _ in spool.spool_dir.glob("*/*.dcm"))


def sweep_orphans(spool: Spool, sessions: sessionmaker[Session], parse: Parse) -> Sweep:
    """Register every spool file no instance row names, or quarantine it if it is unreadable."""
    on_disk = {str(p.relative_to(spool.root)): p for p in spool.spool_dir.glob("*/*.dcm")}
    if not on_disk:
        return Sweep()
    with sessions() as s:
        known = set(s.scalars(select(Instance.spool_path)))
    registered = quarantined_n = 0
    for rel in sorted(on_disk.keys() - known):
        path = on_disk[rel]
        raw = path.read_bytes()
        try:
            received = _read_back(spool, path, raw, parse)
        except IngestError as exc:
            _quarantine(spool, sessions, path, raw, exc)
            quarantined_n += 1
            continue
        with sessions.begin() as s:
            recorded = record_instance(s, received, None, utcnow())
            record_event(s, _STAGE, "instance.recovered", level="warning",
                         study_instance_uid=received.info.study_instance_uid,
                         sop_instance_uid=received.info.sop_instance_uid,
                         details={"spool_path": rel, "outcome": recorded.outcome.value})
        registered += recorded.outcome is not Outcome.DUPLICATE
    sweep = Sweep(registered=registered, quarantined=quarantined_n)
    if registered or quarantined_n:
        log.warning("spool.orphans", registered=sweep.registered, quarantined=sweep.quarantined)
    return sweep


def _read_back(spool: Spool, path: Path, raw: bytes, parse: Parse) -> Received:
    """The :class:`Received` a spool file was written for; IngestError if it is not one."""
    try:
        syntax = str(read_file_meta_info(path).TransferSyntaxUID)
        # The data set starts after the File Meta group, whose first element is its length.
        start = 132 + 12 + int.from_bytes(raw[140:144], "little")
    except Exception as exc:  # noqa: BLE001 -- pydicom raises assorted types on corrupt input
        raise IngestError(0xC210, f"orphan spool file without readable file meta: {exc!r}") from exc
    info = parse(raw, syntax, None)
    sha = hashlib.sha256(raw[start:]).hexdigest()
    if spool.instance_path(info.study_instance_uid, info.sop_instance_uid, sha) != path:
        raise IngestError(0xC210, "orphan spool file whose name does not match its content")
    return Received(info=info, sha256=sha, size=len(raw),
                    spool_path=str(path.relative_to(spool.root)))


def _quarantine(spool: Spool, sessions: sessionmaker[Session], path: Path, raw: bytes,
                exc: IngestError) -> None:
    sha = hashlib.sha256(raw).hexdigest()
    reason = f"orphan spool file: {exc.reason}"
    now = utcnow()
    kept = spool.quarantine([raw], sha, {
        "status": f"0x{exc.status:04X}", "reason": reason, "spool_path": str(path),
        "received_at": dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC).isoformat(),
        "sha256": sha,
    })
    with sessions.begin() as s:
        quarantined(s, association_id=None, status=exc.status, reason=reason,
                    path=str(kept.relative_to(spool.root)), sop_class_uid=None,
                    sop_instance_uid=None, size=len(raw), sha256=sha, now=now)
    path.unlink()
    log.warning("spool.orphan_quarantined", path=str(kept), reason=reason)
