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

The rows' SQL is in :mod:`dicomai.store.outbox`, the DIMSE in :mod:`dicomai.net.sender`.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

import structlog
from pynetdicom.status import code_to_category
from sqlalchemy.orm import Session, sessionmaker

from dicomai.config import Destination, Settings
from dicomai.net.sender import Attempt, send_batch, send_chunked
from dicomai.store import outbox as store
from dicomai.store.models import utcnow

__all__ = ["Outcome", "OutboxWorker", "Sender", "backoff_s", "status_outcome"]

log = structlog.get_logger("dicomai.deliver")


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


def attempt_outcome(attempt: Attempt) -> tuple[Outcome, str | None]:
    """The row's outcome and the error to record for one attempt."""
    if attempt.status is None:
        return (Outcome.DEAD if attempt.permanent else Outcome.RETRY), attempt.error
    outcome = status_outcome(attempt.status)
    if outcome == Outcome.SENT:
        return outcome, None
    code = attempt.status
    return outcome, (f"C-STORE status 0x{code:04X} from {attempt.peer}"
                     + (f": {_PERMANENT[code]}" if code in _PERMANENT else "")
                     + (f" ({attempt.comment})" if attempt.comment is not None else ""))


class Sender:
    """Sends due outbox rows; one call of :meth:`run_once` is one round over all destinations."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session],
                 clock: Callable[[], dt.datetime] = utcnow, rng: Callable[[], float] = random.random) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.rng = rng
        send_chunked()  # process-wide in pynetdicom: set by the one component that sends

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Expire old rows, then send what is due; returns how many objects were attempted."""
        with self.sessions.begin() as s:
            expired = store.expire(s, self.clock())
            purged = store.drop_purged(s)
        for e in expired:
            log.error("outbox.expired", item=e.item_id, destination=e.destination, attempts=e.attempts)
        for e in purged:
            log.error("outbox.dead", item=e.item_id, destination=e.destination, error="result file purged")
        with self.sessions() as s:
            due = store.due(s, self.clock(), self.settings.outbox.batch_size)
            s.rollback()
        attempted = 0
        for name, items in due.items():
            if stop is not None and stop.is_set():
                break
            try:
                dest = self.settings.destination(name)
            except Exception:  # noqa: BLE001 -- removed from the configuration meanwhile
                for item in items:
                    self._settle(item, Outcome.DEAD, None, "destination no longer configured")
                continue
            attempted += self._send(dest, items, stop)
        return attempted

    def has_due(self) -> bool:
        with self.sessions() as s:
            found = store.has_due(s, self.clock())
            s.rollback()
        return found

    def _send(self, dest: Destination, items: list[store.Due], stop: threading.Event | None) -> int:
        files = [(self.settings.data_dir / Path(i.path), i.sop_class_uid) for i in items]

        def report(n: int, attempt: Attempt) -> None:
            outcome, error = attempt_outcome(attempt)
            self._settle(items[n], outcome, attempt.status, error)

        batch = send_batch(self.settings.node, dest, files, report, stop)
        if batch.association_error is not None:
            log.warning("outbox.association_failed", destination=dest.name, error=batch.association_error)
        return batch.attempted

    def _settle(self, due: store.Due, outcome: Outcome, status: int | None, error: str | None) -> None:
        now = self.clock()
        o = self.settings.outbox

        def retry_at(attempts: int) -> dt.datetime:
            delay = backoff_s(attempts, o.initial_backoff_s, o.max_backoff_s, self.rng)
            return now + dt.timedelta(seconds=delay)

        with self.sessions.begin() as s:
            recorded = store.settle(s, due, outcome, status, error, now, retry_at)
        log.info(f"outbox.{recorded}", item=due.item_id, destination=due.destination, kind=due.kind,
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
