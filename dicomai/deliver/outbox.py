"""Delivery of result objects: the durable outbox and the C-STORE sender that drains it.

Every result object has one ``outbox`` row per destination. :class:`Sender` picks the rows
that are due, groups them by destination and sends each group over one association
(C-STORE SCU, at most ``outbox.batch_size`` objects). Each attempt is settled in its own
transaction and audited:

* success or warning status: ``sent``;
* a failure that retrying cannot fix (association rejected permanently, e.g. calling AE title
  not recognised; no presentation context accepted for the object's SOP class; a status
  saying the object itself is refused): ``dead`` at once, with the reason;
* anything else (connection refused, timeout, abort, transient rejection, out of resources):
  retried after an exponential back-off with jitter, until ``expires_at``, then ``dead``.

Delivery is at least once: a node killed between the peer's success response and the
commit sends that object again after restart, with the same SOP Instance UID, so the PACS
keeps one copy. ``dicomai outbox retry`` puts dead rows back in the queue.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.status import code_to_category
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.config import Destination, Settings
from dicomai.net.dimse import set_nodelay
from dicomai.store import OutboxItem, OutboxState, ResultObject, Study, record_event
from dicomai.store.models import utcnow

__all__ = ["Outcome", "OutboxWorker", "Sender", "backoff_s", "status_outcome"]

log = structlog.get_logger("dicomai.deliver.outbox")
# Send result files straight from disk in chunks instead of decoding each into memory
# (a 2048 px RGB Secondary Capture is 12 MB).
pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
_STAGE = "outbox"


class Outcome(StrEnum):
    SENT = "sent"
    RETRY = "retry"
    DEAD = "dead"


# C-STORE failure statuses that say the object itself is refused: sending it again cannot help.
_PERMANENT = {0x0122: "SOP class not supported", 0x0124: "not authorised", 0x0117: "invalid SOP instance",
              0x0211: "unrecognised operation"}


def status_outcome(code: int) -> Outcome:
    """What a C-STORE response status means for the outbox row."""
    category = code_to_category(code)
    if category in ("Success", "Warning"):
        return Outcome.SENT
    if code in _PERMANENT or 0xA900 <= code <= 0xA9FF or 0xC000 <= code <= 0xCFFF:
        return Outcome.DEAD  # refused / data set does not match SOP class / cannot understand
    return Outcome.RETRY  # out of resources (A7xx), processing failure (0110), ...


def backoff_s(attempts: int, initial: float, maximum: float,
              rng: Callable[[], float] = random.random) -> float:
    """Delay before the next try after ``attempts`` failed ones: doubling, capped, half jittered."""
    base = min(maximum, initial * 2.0 ** max(0, attempts - 1))
    return base / 2 + rng() * base / 2


@dataclass(frozen=True)
class _Due:
    item_id: int
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    kind: str
    study_uid: str


class Sender:
    """Sends due outbox rows; one call of :meth:`run_once` is one round over all destinations."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 clock: Callable[[], dt.datetime] = utcnow, rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.rng = rng

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Expire old rows, then send what is due; returns how many objects were attempted."""
        self._expire()
        attempted = 0
        for name, items in self._due().items():
            if stop is not None and stop.is_set():
                break
            try:
                dest = self.settings.destination(name)
            except Exception:  # noqa: BLE001 -- removed from the configuration meanwhile
                for item in items:
                    self._settle(item, name, Outcome.DEAD, None, "destination no longer configured")
                continue
            attempted += self._send_batch(dest, items, stop)
        return attempted

    def has_due(self) -> bool:
        with self.sessions() as s:
            found = s.scalar(select(OutboxItem.id).where(
                OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= self.clock()).limit(1))
            s.rollback()
        return found is not None

    def _expire(self) -> None:
        now = self.clock()
        with self.sessions.begin() as s:
            rows = s.execute(select(OutboxItem, ResultObject.sop_instance_uid, Study.study_instance_uid)
                             .join(ResultObject, ResultObject.id == OutboxItem.result_id)
                             .join(Study, Study.id == ResultObject.study_id)
                             .where(OutboxItem.state == OutboxState.PENDING, OutboxItem.expires_at <= now)
                             ).all()
            for item, sop_uid, study_uid in rows:
                item.state = OutboxState.DEAD
                item.last_error = f"not delivered before {item.expires_at.isoformat()}: {item.last_error}"
                record_event(s, _STAGE, "outbox.dead", level="error", study_instance_uid=study_uid,
                             sop_instance_uid=sop_uid, error=item.last_error,
                             details={"destination": item.destination, "attempts": item.attempts,
                                      "item": item.id})
        for item, _, _ in rows:
            log.error("outbox.expired", item=item.id, destination=item.destination, attempts=item.attempts)

    def _due(self) -> dict[str, list[_Due]]:
        with self.sessions() as s:
            rows = s.execute(
                select(OutboxItem.id, OutboxItem.destination, ResultObject.path, ResultObject.sop_class_uid,
                       ResultObject.sop_instance_uid, ResultObject.kind, Study.study_instance_uid)
                .join(ResultObject, ResultObject.id == OutboxItem.result_id)
                .join(Study, Study.id == ResultObject.study_id)
                .where(OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= self.clock())
                .order_by(OutboxItem.id)).all()
            s.rollback()
        due: dict[str, list[_Due]] = {}
        for item_id, dest, path, sop_class, sop_uid, kind, study_uid in rows:
            group = due.setdefault(dest, [])
            if len(group) < self.settings.outbox.batch_size:
                group.append(_Due(item_id, path or "", sop_class, sop_uid, kind, study_uid))
        return due

    def _send_batch(self, dest: Destination, items: list[_Due], stop: threading.Event | None) -> int:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        for sop_class in dict.fromkeys(i.sop_class_uid for i in items):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        answers: list[A_ASSOCIATE] = []  # the peer's A-ASSOCIATE-AC or -RJ

        def _on_acse(event: Any) -> None:
            if isinstance(event.primitive, A_ASSOCIATE) and event.primitive.result is not None:
                answers.append(event.primitive)

        opened: list[bool] = []
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, set_nodelay),
                               (evt.EVT_CONN_OPEN, lambda _e: opened.append(True)),
                               (evt.EVT_ACSE_RECV, _on_acse)]
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=node.max_pdu_size,
                             evt_handlers=handlers)
        if not assoc.is_established and opened and not answers:
            # Connected, but no answer seen: a peer that rejects and closes at once can race
            # pynetdicom's reading of the A-ASSOCIATE-RJ (seen with Orthanc). Ask once more
            # so that a permanent rejection is recognised on this attempt.
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=node.max_pdu_size,
                                 evt_handlers=handlers)
        where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        if not assoc.is_established:
            rj = answers[0] if answers else None
            if rj is not None and rj.result in (1, 2):
                outcome = Outcome.DEAD if rj.result == 1 else Outcome.RETRY
                error = (f"association rejected by {where} ({rj.result_str}, {rj.source_str}): "
                         f"{rj.reason_str}")
            elif rj is not None:  # accepted, but not one presentation context: pynetdicom aborts
                outcome, error = Outcome.DEAD, f"{where} accepted no presentation context for these objects"
            else:
                outcome = Outcome.RETRY
                error = f"cannot associate with {where} (connection refused or timed out)"
            for item in items:
                self._settle(item, dest.name, outcome, None, error)
            log.warning("outbox.association_failed", destination=dest.name, outcome=outcome, error=error)
            return len(items)
        attempted = 0
        try:
            for item in items:
                if stop is not None and stop.is_set():
                    break
                attempted += 1
                if not any(cx.abstract_syntax == item.sop_class_uid for cx in assoc.accepted_contexts):
                    self._settle(item, dest.name, Outcome.DEAD, None, f"{where} accepted no "
                                 f"presentation context for SOP class {item.sop_class_uid}")
                    continue
                path = self.settings.data_dir / item.path
                if not path.is_file():
                    self._settle(item, dest.name, Outcome.DEAD, None, f"result file missing: {item.path}")
                    continue
                try:
                    status = self._store(assoc, path)
                except ValueError as exc:  # no accepted context fits, even after conversion
                    self._settle(item, dest.name, Outcome.DEAD, None, f"C-STORE not sent to {where}: {exc}")
                    continue
                except (OSError, RuntimeError) as exc:  # file unreadable now / association gone
                    self._settle(item, dest.name, Outcome.RETRY, None, f"C-STORE not sent to {where}: {exc}")
                    break
                if not status or "Status" not in status:
                    self._settle(item, dest.name, Outcome.RETRY, None,
                                 f"no C-STORE response from {where} (timeout or abort)")
                    break
                code = int(status.Status)
                outcome = status_outcome(code)
                failure: str | None = None if outcome == Outcome.SENT else (
                    f"C-STORE status 0x{code:04X} from {where}"
                    + (f": {_PERMANENT[code]}" if code in _PERMANENT else "")
                    + (f" ({status.ErrorComment})" if "ErrorComment" in status else ""))
                self._settle(item, dest.name, outcome, code, failure)
        finally:
            if assoc.is_established:
                assoc.release()
        return attempted

    @staticmethod
    def _store(assoc: Any, path: Path) -> Any:
        """C-STORE streamed from the file (no decoding, little memory); when the peer took
        neither of our uncompressed syntaxes as they are in the file, decode and let
        pynetdicom convert."""
        try:
            return assoc.send_c_store(path)
        except ValueError:
            return assoc.send_c_store(dcmread(path))

    def _settle(self, due: _Due, destination: str, outcome: Outcome, status: int | None,
                error: str | None) -> None:
        now = self.clock()
        with self.sessions.begin() as s:
            item = s.get_one(OutboxItem, due.item_id)
            item.attempts += 1
            item.last_attempt_at = now
            item.last_status = status
            item.last_error = error
            if outcome == Outcome.RETRY:
                delay = backoff_s(item.attempts, self.settings.outbox.initial_backoff_s,
                                  self.settings.outbox.max_backoff_s, self.rng)
                item.next_attempt_at = now + dt.timedelta(seconds=delay)
                if item.next_attempt_at >= item.expires_at:
                    outcome = Outcome.DEAD
                    item.last_error = f"not delivered before {item.expires_at.isoformat()}: {error}"
            if outcome == Outcome.SENT:
                item.state, item.sent_at = OutboxState.SENT, now
            elif outcome == Outcome.DEAD:
                item.state = OutboxState.DEAD
            details: dict[str, Any] = {"destination": destination, "attempt": item.attempts, "kind": due.kind,
                                       "status": status, "item": item.id}
            if outcome == Outcome.RETRY:
                details["next_attempt_at"] = item.next_attempt_at.isoformat()
            record_event(s, _STAGE, f"outbox.{outcome}", level="info" if outcome == Outcome.SENT else
                         ("warning" if outcome == Outcome.RETRY else "error"),
                         study_instance_uid=due.study_uid, sop_instance_uid=due.sop_instance_uid,
                         details=details, error=item.last_error)
        log.info(f"outbox.{outcome}", item=due.item_id, destination=destination, kind=due.kind,
                 status=None if status is None else f"0x{status:04X}", error=error)


class OutboxWorker:
    """The sender's thread: runs a round every ``interval`` seconds, or at once when kicked."""

    def __init__(self, sender: Sender, interval: float) -> None:
        self.sender = sender
        self.interval = interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dicomai-outbox", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def kick(self) -> None:
        """New objects are queued: send them now instead of at the next poll."""
        self._wake.set()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                self.sender.run_once(self._stop)
                if self.sender.has_due():  # a full batch, or more arrived: go on at once
                    self._wake.set()
            except Exception:  # the database may be briefly unavailable: log, try again later
                log.exception("outbox.round_failed")
            self._wake.wait(self.interval)
