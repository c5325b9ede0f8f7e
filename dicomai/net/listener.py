"""The DICOM listener: C-ECHO and C-STORE SCP with access control and a durable spool.

Handler contracts (pynetdicom runs each association in its own thread):

* ``EVT_CONN_OPEN``: wraps the socket in the guard (:mod:`dicomai.net.guard`), which on the
  TLS port completes the handshake first; a failed handshake is logged and audited as a
  rejected association with the TLS reason, before any PDU is read.
* ``EVT_REQUESTED``: checks the called AE title, the calling AE/host (and, over TLS,
  certificate subject) allow-list, the association limit and that at least one proposed
  presentation context is acceptable, records the association (accepted or rejected) and
  sends A-ASSOCIATE-RJ when refused.
* ``EVT_C_STORE``: returns 0x0000 only after the object is fsynced in the spool and its
  row is committed in the audit database. Otherwise it returns a precise failure status:
  0xA700 (disk nearly full, or the spool or the audit database out of space), 0xA900
  (required UID missing or not matching the request), 0xC210 (cannot be parsed or
  truncated, object quarantined), 0x0110 (internal failure). The status is decided before
  the audit row of a refusal is written, and stands when that write fails too (a full disk
  fails both). It never raises: an exception becomes a status and, if it can, an audit row.
* ``EVT_CONN_CLOSE`` (or the guarded socket's close, whichever comes first): closes the
  association row with its end state and logs one summary line. Every association the
  listener accepted ends there, also one pynetdicom ends without an event.

Every statement against the audit database is in :mod:`dicomai.store.ingest`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom.dataset import FileMetaDataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.presentation import negotiate_as_acceptor
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from dicomai.config import Settings
from dicomai.errors import IngestError
from dicomai.net import guard, protocol, tls
from dicomai.net.dimse import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SUCCESS,
    TRANSFER_SYNTAXES,
    UNCOMPRESSED,
    encode_header,
    parse_instance,
    set_nodelay,
)
from dicomai.store import ingest as store
from dicomai.store.models import utcnow
from dicomai.store.spool import Spool

__all__ = ["Receiver"]

log = structlog.get_logger("dicomai.net.listener")

# A-ASSOCIATE-RJ result, source and reason (PS3.8 9.3.4).
_PERMANENT, _TRANSIENT = 0x01, 0x02
_SERVICE_USER, _SERVICE_PROVIDER_PRESENTATION = 0x01, 0x03
_NO_REASON, _CALLING_AE_NOT_RECOGNISED, _CALLED_AE_NOT_RECOGNISED = 0x01, 0x03, 0x07
_LOCAL_LIMIT_EXCEEDED = 0x02
_LIMIT_REASON = "association limit (node.max_associations) reached"
#: pynetdicom's own limit, on association threads, as a multiple of node.max_associations.
_THREAD_BACKSTOP = 10


@dataclass
class _AssocStats:
    row_id: int | None
    calling_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    duplicates: int = 0
    bytes: int = 0
    failures: int = 0
    echoes: int = 0
    end_state: str = "closed"  # until released, aborted or rejected: the connection just closed
    refusal: str | None = None  # set: every C-STORE is refused with 0xA700 and this reason
    ended: bool = False  # released, aborted or rejected: no longer counts against the limit


class Receiver:
    """Owns the pynetdicom AE and the handlers bound to it."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        sessions: sessionmaker[Session],
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.sessions = sessions
        self._db_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._stats: dict[int, _AssocStats] = {}
        node = settings.node
        # Spool writes, one per association at most; threads start on first use.
        self._writer = ThreadPoolExecutor(max_workers=node.max_associations,
                                          thread_name_prefix="spool-write")
        self._limits = guard.Limits(
            network_timeout_s=node.network_timeout_s, acse_timeout_s=node.acse_timeout_s,
            max_pdu_size=node.max_pdu_size, max_object_bytes=node.max_object_mb * 2**20,
        )

    # -- set-up -----------------------------------------------------------------------
    def build_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        # The limit is enforced in _on_requested over associations that have not ended.
        # pynetdicom counts threads, which includes associations already released and still
        # waiting to write their audit row, and connections that have not sent a request
        # yet: at exactly the limit, senders that reconnect at once were refused. Its own
        # check stays as a backstop for when closing threads pile up behind a stalled
        # database (10 senders reconnecting at once on SQLite left up to 18 threads).
        ae.maximum_associations = _THREAD_BACKSTOP * node.max_associations
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.require_called_aet = False  # checked in _on_requested so rejections are audited
        ae.add_supported_context(Verification, UNCOMPRESSED)
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    def handlers(self) -> list[tuple[Any, ...]]:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_end, ["released"]),
            (evt.EVT_ABORTED, self._on_end, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_close),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_DIMSE_RECV, guard.message_received),
        ]

    def close(self) -> None:
        """Stop the spool writer threads (after the AE has shut down)."""
        self._writer.shutdown(wait=True)

    @property
    def active(self) -> int:
        """Associations accepted and not yet closed."""
        with self._stats_lock:
            return len(self._stats)

    # -- association lifecycle ----------------------------------------------------------
    def _on_conn_open(self, event: Any) -> None:
        set_nodelay(event)
        assoc = event.assoc
        guard.install(event, self._limits, lambda drop: self._on_dropped(assoc, drop),
                      on_finished=lambda: self._finish(assoc))
        protocol.contain(assoc, lambda reason: self._aborted(assoc, reason))

    def _on_dropped(self, assoc: Any, drop: guard.Drop) -> None:
        # The guard closed the connection (timeout, oversized PDU or object, unusable AE
        # title, failed TLS handshake); pynetdicom now ends the association as if the peer
        # had gone.
        if drop.tls:
            peer = store.Peer(host=assoc.requestor.address, port=int(assoc.requestor.port),
                              calling_ae="", called_ae="")
            log.warning("tls.rejected", peer=peer.host, reason=drop.reason)
            self._audit("association.rejected", store.association_requested, peer,
                        drop.reason[:128], utcnow())
            return
        if drop.rejected:
            peer = store.Peer(host=assoc.requestor.address, port=int(assoc.requestor.port),
                              calling_ae=drop.calling_ae, called_ae=drop.called_ae)
            log.warning("association.rejected", peer=peer.host, calling_ae=peer.calling_ae,
                        called_ae=peer.called_ae, reason=drop.reason)
            self._audit("association.rejected", store.association_requested, peer, drop.reason,
                        utcnow())
            return
        self._aborted(assoc, drop.reason, event="connection.dropped")

    def _aborted(self, assoc: Any, reason: str, event: str = "association.aborted") -> None:
        """The node ended ``assoc`` itself (a limit, a protocol error): log and audit why."""
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        stats = self._get(assoc)
        log.warning(event, peer=peer, reason=reason,
                    association_id=stats.row_id if stats else None)
        if stats is not None and stats.row_id is not None:
            stats.end_state, stats.ended = "aborted", True
            self._audit("association.aborted", store.association_aborted, stats.row_id, reason, peer)

    def _on_requested(self, event: Any) -> None:
        # Every decision that protects the node is taken before, and whatever becomes of, the
        # audit row: a database that is down must never let an unknown caller in.
        assoc = event.assoc
        rq = assoc.requestor.primitive
        peer = store.Peer(host=assoc.requestor.address, port=int(assoc.requestor.port),
                          calling_ae=str(rq.calling_ae_title).strip(),
                          called_ae=str(rq.called_ae_title).strip())
        subject = tls.subject_text(guard.peer_certificate(assoc))
        reason = self.settings.access.check(peer.calling_ae, peer.host, peer.called_ae,
                                            self.settings.node.ae_title, cert_subject=subject)
        if reason:
            called = reason.startswith("called")
            self._reject(assoc, peer, reason, _PERMANENT, _SERVICE_USER,
                         _CALLED_AE_NOT_RECOGNISED if called else _CALLING_AE_NOT_RECOGNISED)
            return
        accepted, _ = negotiate_as_acceptor(rq.presentation_context_definition_list,
                                            assoc.acceptor.supported_contexts)
        if not any(cx.result == 0x00 for cx in accepted):
            # An AC without a usable context leaves the peer nothing to do but hang up.
            self._reject(assoc, peer, "no acceptable presentation context", _PERMANENT,
                         _SERVICE_USER, _NO_REASON)
            return
        stats = _AssocStats(row_id=None, calling_ae=peer.calling_ae, peer=peer.host)
        with self._stats_lock:  # count and reserve the slot at once
            live = sum(not s.ended for s in self._stats.values())
            if live < self.settings.node.max_associations:
                self._stats[id(assoc)] = stats
        if self._get(assoc) is not stats:
            self._reject(assoc, peer, _LIMIT_REASON, _TRANSIENT, _SERVICE_PROVIDER_PRESENTATION,
                         _LOCAL_LIMIT_EXCEEDED)
            return
        try:
            with self.sessions.begin() as s:
                stats.row_id = store.association_requested(s, peer, None, utcnow())
        except Exception as exc:  # noqa: BLE001 -- what cannot be audited is not accepted
            if store.is_out_of_space(exc):
                # Nothing gets in through this association, so it need not be refused: the
                # sender learns from 0xA700 (not an association rejection) to retry later.
                stats.refusal = "out of resources: audit database or disk full"
                log.error("association.unaudited", peer=peer.host, calling_ae=peer.calling_ae,
                          reason=stats.refusal, error=repr(exc))
                return
            with self._stats_lock:
                self._stats.pop(id(assoc), None)
            log.exception("association.refused", peer=peer.host, calling_ae=peer.calling_ae,
                          called_ae=peer.called_ae, reason="audit database unavailable")
            assoc.acse.send_reject(_TRANSIENT, _SERVICE_PROVIDER_PRESENTATION, _LOCAL_LIMIT_EXCEEDED)
            assoc.is_rejected = True
            assoc.kill()

    def _reject(self, assoc: Any, peer: store.Peer, reason: str, result: int, source: int,
                diagnostic: int) -> None:
        """Send A-ASSOCIATE-RJ, then audit it (the answer does not wait for the database)."""
        log.warning("association.rejected", peer=peer.host, calling_ae=peer.calling_ae,
                    called_ae=peer.called_ae, reason=reason)
        assoc.acse.send_reject(result, source, diagnostic)
        assoc.is_rejected = True
        self._audit("association.rejected", store.association_requested, peer, reason, utcnow())
        assoc.kill()

    def _on_rejected(self, event: Any) -> None:
        # Rejections decided by pynetdicom itself (its backstop on association threads).
        stats = self._get(event.assoc)
        if stats is None or stats.row_id is None:
            return
        stats.end_state, stats.ended = "rejected", True
        self._audit("association.rejected", store.association_rejected, stats.row_id,
                    f"rejected by the DICOM layer ({_LIMIT_REASON})")

    def _on_end(self, event: Any, state: str) -> None:
        stats = self._get(event.assoc)
        if stats is not None and not stats.ended:
            stats.end_state, stats.ended = state, True

    def _on_close(self, event: Any) -> None:
        self._finish(event.assoc)

    def _finish(self, assoc: Any) -> None:
        """Close the books of ``assoc`` once: its row's end state and totals, one log line."""
        with self._stats_lock:
            stats = self._stats.pop(id(assoc), None)
        if stats is None or stats.row_id is None:
            return
        self._audit("association.closed", store.association_closed, stats.row_id, stats.end_state,
                    stats.instances, stats.bytes, stats.failures, utcnow())
        log.info(
            "association.closed", association_id=stats.row_id, peer=stats.peer,
            calling_ae=stats.calling_ae, end=stats.end_state, instances=stats.instances,
            duplicates=stats.duplicates, failures=stats.failures, echoes=stats.echoes,
            mbytes=round(stats.bytes / 2**20, 3),
            seconds=round(time.monotonic() - stats.started, 3),
        )

    def _audit(self, record: str, write: Callable[..., object], *args: Any) -> None:
        """Run ``write(session, *args)`` in its own transaction; log when the database fails.

        For rows that follow a decision already taken (and sent to the peer).
        """
        try:
            with self.sessions.begin() as s:
                write(s, *args)
        except Exception as exc:  # noqa: BLE001 -- the peer has its answer; the log keeps the rest
            if store.is_out_of_space(exc):
                log.error("audit.unavailable", record=record, error=repr(exc))
            else:
                log.exception("audit.unavailable", record=record)

    def _get(self, assoc: Any) -> _AssocStats | None:
        with self._stats_lock:
            return self._stats.get(id(assoc))

    # -- services -------------------------------------------------------------------------
    def _on_echo(self, event: Any) -> int:
        stats = self._get(event.assoc)
        if stats is not None:
            stats.echoes += 1
        return STATUS_SUCCESS

    def _on_store(self, event: Any) -> int:
        stats = self._get(event.assoc)
        assoc_id = stats.row_id if stats else None
        try:
            status = self._store(event, assoc_id, stats)
        except Exception as exc:  # the last net: never let a handler crash the association
            log.exception("instance.failed", association_id=assoc_id, error=repr(exc))
            self._audit("instance.failed", store.instance_failed, assoc_id, repr(exc))
            status = self._keep_unexpected(event, assoc_id, exc)
        if status != STATUS_SUCCESS and stats is not None:
            stats.failures += 1
        return status

    def _store(self, event: Any, assoc_id: int | None, stats: _AssocStats | None) -> int:
        request_uid = str(event.request.AffectedSOPInstanceUID or "")
        if stats is not None and stats.refusal is not None:
            return self._refuse(IngestError(STATUS_OUT_OF_RESOURCES, stats.refusal), assoc_id,
                                request_uid[:64] or None)
        meta: FileMetaDataset = event.file_meta
        if stats is not None:
            meta.SourceApplicationEntityTitle = stats.calling_ae
        header = encode_header(meta)
        # One Part 10 buffer serves the spool, parsing and the quarantine alike, made with one
        # copy of the received data set (a 7 MB copy costs milliseconds).
        encoded, data = _part10(header, event)
        try:
            self.spool.check_space(len(encoded))
        except IngestError as exc:
            return self._refuse(exc, assoc_id, request_uid[:64] or None)
        # The bytes go to disk (write and fsync, GIL released) while this thread hashes and
        # parses; the file gets its content-addressed name only once the object is accepted.
        ts = str(meta.TransferSyntaxUID)
        staged = self._writer.submit(self.spool.write_temp, [encoded])
        try:
            sha = hashlib.sha256(data).hexdigest()
            info = parse_instance(encoded, ts, request_uid)
        except IngestError as exc:
            _discard(staged)
            return self._quarantine(exc, encoded, sha, ts, request_uid, event, assoc_id)
        except BaseException:
            _discard(staged)
            raise

        # Content-addressed path: writing an identical re-send again is harmless, and it
        # saves a database round trip per instance to check for duplicates only afterwards.
        try:
            path = self.spool.place(staged.result(), self.spool.instance_path(
                info.study_instance_uid, info.sop_instance_uid, sha))
        except IngestError as exc:
            return self._refuse(exc, assoc_id, info.sop_instance_uid)
        received = store.Received(info=info, sha256=sha, size=len(encoded),
                                  spool_path=str(path.relative_to(self.spool.root)))
        try:
            outcome = self._record(received, assoc_id)
        except Exception as exc:
            if not store.is_out_of_space(exc):
                raise
            # The spool file stays: the orphan sweep at start registers it (store.integrity).
            refusal = IngestError(STATUS_OUT_OF_RESOURCES,
                                  f"out of resources: audit database full ({type(exc).__name__})")
            return self._refuse(refusal, assoc_id, info.sop_instance_uid)
        if stats is not None:
            if outcome is store.Outcome.DUPLICATE:
                stats.duplicates += 1
            else:
                stats.instances += 1
                stats.bytes += received.size
        return STATUS_SUCCESS

    def _keep_unexpected(self, event: Any, assoc_id: int | None, exc: Exception) -> int:
        """0x0110 for a failure nothing foresaw, with the object kept in quarantine for
        inspection (when its bytes can still be had)."""
        failure = IngestError(STATUS_PROCESSING_FAILURE, f"unexpected failure: {exc!r}"[:1024])
        try:
            meta: FileMetaDataset = event.file_meta
            encoded, _ = _part10(encode_header(meta), event)
            return self._quarantine(failure, encoded, hashlib.sha256(encoded).hexdigest(),
                                    str(meta.TransferSyntaxUID),
                                    str(event.request.AffectedSOPInstanceUID or ""), event, assoc_id)
        except Exception:  # noqa: BLE001 -- the status stands even when nothing can be kept
            log.exception("quarantine.write_failed", association_id=assoc_id)
            return STATUS_PROCESSING_FAILURE

    def _refuse(self, exc: IngestError, assoc_id: int | None, sop_uid: str | None) -> int:
        """Answer ``exc.status`` for an instance not kept; audit it if the database can."""
        log.error("instance.refused", association_id=assoc_id, status=f"0x{exc.status:04X}",
                  reason=exc.reason)
        self._audit("instance.refused", store.instance_refused, assoc_id, sop_uid, exc.reason)
        return exc.status

    def _record(self, received: store.Received, assoc_id: int | None) -> store.Outcome:
        """Commit one received instance with its study and series rows."""
        # One recording at a time: the duplicate check and the version it computes must see
        # the previous instance of the same SOP Instance UID committed.
        with self._db_lock, self.sessions.begin() as s:
            recorded = store.record_instance(s, received, assoc_id, utcnow())
        info = received.info
        if recorded.outcome is store.Outcome.CONFLICT:
            log.warning("instance.conflict", study_uid=info.study_instance_uid,
                        sop_uid=info.sop_instance_uid, version=recorded.version)
        elif recorded.outcome is store.Outcome.STORED:
            log.debug("instance.stored", study_uid=info.study_instance_uid,
                      sop_uid=info.sop_instance_uid, size=received.size)
        return recorded.outcome

    def _quarantine(self, exc: IngestError, encoded: bytes, sha: str, ts: str,
                    request_uid: str, event: Any, assoc_id: int | None) -> int:
        sop_class = str(event.request.AffectedSOPClassUID or "")[:64] or None
        meta = {
            "status": f"0x{exc.status:04X}", "reason": exc.reason, "transfer_syntax": ts,
            "requested_sop_instance_uid": request_uid, "sop_class_uid": sop_class,
            "association_id": assoc_id, "peer": event.assoc.requestor.address,
            "calling_ae": str(event.assoc.requestor.ae_title).strip(),
            "received_at": utcnow().isoformat(), "sha256": sha,
        }
        path_str = ""
        try:
            path = self.spool.quarantine([encoded], sha, meta)
            path_str = str(path.relative_to(self.spool.root))
        except Exception as write_exc:  # noqa: BLE001 -- still answer with the original status
            log.error("quarantine.write_failed", error=repr(write_exc))
        self._audit("instance.quarantined", functools.partial(
            store.quarantined, association_id=assoc_id, status=exc.status, reason=exc.reason,
            path=path_str, sop_class_uid=sop_class, sop_instance_uid=request_uid[:64] or None,
            size=len(encoded), sha256=sha, now=utcnow()))
        log.error("instance.quarantined", association_id=assoc_id, status=f"0x{exc.status:04X}",
                  reason=exc.reason, path=path_str)
        return exc.status


def _part10(header: bytes, event: Any) -> tuple[bytes, memoryview]:
    """The received object as a Part 10 stream (``header`` + data set) and a view of its data
    set; the data set is copied once, straight from pynetdicom's buffer."""
    stream = getattr(getattr(event, "request", None), "DataSet", None)
    if isinstance(stream, io.BytesIO):
        with stream.getbuffer() as view:
            encoded = b"".join((header, view))
    else:  # not pynetdicom's usual buffer: its own copy, then ours
        encoded = header + event.encoded_dataset(include_meta=False)
    return encoded, memoryview(encoded)[len(header):]


def _discard(staged: Future[Path]) -> None:
    """Remove a staged spool file whose object is not kept (it is quarantined, or failed)."""
    try:
        staged.result().unlink(missing_ok=True)
    except Exception:  # noqa: BLE001 -- the write failed too: nothing to remove
        log.debug("spool.stage_discarded")
