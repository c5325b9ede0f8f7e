"""The DICOM listener: C-ECHO and C-STORE SCP with access control and a durable spool.

Handler contracts (pynetdicom runs each association in its own thread):

* ``EVT_REQUESTED``: checks the called AE title and the calling AE/host allow-list,
  records the association (accepted or rejected) and sends A-ASSOCIATE-RJ when refused.
* ``EVT_C_STORE``: returns 0x0000 only after the object is fsynced in the spool and its
  row is committed in the audit database. Otherwise it returns a precise failure status:
  0xA700 (disk nearly full), 0xA900 (required UID missing or not matching the request),
  0xC210 (cannot be parsed or truncated, object quarantined), 0x0110 (internal failure).
  It never raises: an exception becomes a status and an audit row.
* ``EVT_CONN_CLOSE``: closes the association row and logs one summary line.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.config import Settings
from dicomai.errors import IngestError
from dicomai.store import (
    Association,
    Instance,
    InstanceState,
    Quarantined,
    Series,
    Study,
    StudyState,
    record_event,
)
from dicomai.store.models import utcnow
from dicomai.store.spool import Spool, is_valid_uid

__all__ = ["TRANSFER_SYNTAXES", "ReceivedInstance", "Receiver", "parse_instance", "set_nodelay"]

log = structlog.get_logger("dicomai.net.listener")

#: Every transfer syntax the node accepts, as sent (no transcoding on receipt). pynetdicom
#: picks, per proposed context, the first of *these* that the sender listed; compressed
#: syntaxes come first so that a sender offering its compressed original plus uncompressed
#: fall-backs sends the original, and lossless before lossy so that nothing is made lossy.
TRANSFER_SYNTAXES: list[str] = [
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEG2000Lossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    JPEG2000,
    HTJ2K,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    # Deflate only when it is all the sender offers: on a LAN it costs CPU at both ends.
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]

STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210

_STAGE = "ingest"


@dataclass(frozen=True)
class ReceivedInstance:
    """What the node keeps about one received instance (parsed once, at receipt)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part: str | None
    series_number: int | None
    series_description: str | None
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    study_date: str | None
    study_description: str | None


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _expected_native_length(ds: Dataset) -> int | None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    total_bits = rows * cols * samples * frames * bits
    return (total_bits + 7) // 8


def _first_truncated_element(ds: Dataset) -> str | None:
    """The tag of the first top-level element whose value is shorter than its length.

    pydicom stops quietly at the end of a short stream; the declared lengths tell
    whether what arrived is whole (garbage bytes also show up here, as absurd lengths).
    """
    undefined = 0xFFFFFFFF
    for elem in ds.elements():
        length = getattr(elem, "length", None)
        value = getattr(elem, "value", None)
        if length is None or length == undefined or not isinstance(value, bytes | None):
            continue
        if len(value or b"") < length:
            return str(elem.tag)
    return None


def parse_instance(encoded: bytes, transfer_syntax: str, requested_sop_uid: str | None) -> ReceivedInstance:
    """Parse a received Part 10 stream and check it is complete enough to keep.

    Raises
    ------
    IngestError
        0xC210 when the stream cannot be parsed or its pixel data is truncated,
        0xA900 when a required UID is missing, malformed or differs from the request.
    """
    try:
        ds = dcmread(BytesIO(encoded))
        uids = {
            k: str(ds.get(k, "") or "").strip()
            for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise IngestError(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set: {exc}") from exc
    except Exception as exc:  # pydicom raises assorted types on corrupt input
        raise IngestError(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set: {exc!r}") from exc
    short = _first_truncated_element(ds)
    if short is not None:
        raise IngestError(STATUS_CANNOT_UNDERSTAND, f"data set truncated or corrupt at element {short}")
    missing = [k for k, v in uids.items() if not v]
    if missing:
        raise IngestError(STATUS_DATASET_MISMATCH, f"required attribute(s) missing: {', '.join(missing)}")
    bad = [k for k, v in uids.items() if not is_valid_uid(v)]
    if bad:
        raise IngestError(STATUS_DATASET_MISMATCH, f"malformed UID in {', '.join(bad)}")
    if requested_sop_uid and uids["SOPInstanceUID"] != requested_sop_uid.strip():
        raise IngestError(
            STATUS_DATASET_MISMATCH, "SOP Instance UID differs from the C-STORE request's"
        )
    if "Rows" in ds and "Columns" in ds:
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise IngestError(STATUS_CANNOT_UNDERSTAND, "image without (complete) pixel data: truncated?")
        if "PixelData" in ds and not UID(transfer_syntax).is_encapsulated:
            expected = _expected_native_length(ds)
            got = len(ds.PixelData)
            if expected is not None and got < expected:
                raise IngestError(
                    STATUS_CANNOT_UNDERSTAND,
                    f"pixel data truncated: {got} of {expected} bytes",
                )
    series_number = ds.get("SeriesNumber")
    try:
        series_no = int(series_number) if series_number not in (None, "") else None
    except (TypeError, ValueError):
        series_no = None
    return ReceivedInstance(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=str(transfer_syntax),
        modality=_text(ds, "Modality", 16),
        body_part=_text(ds, "BodyPartExamined", 64),
        series_number=series_no,
        series_description=_text(ds, "SeriesDescription", 64),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_date=_text(ds, "StudyDate", 8),
        study_description=_text(ds, "StudyDescription", 64),
    )


def encode_header(meta: FileMetaDataset) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information, as written before the data set."""
    buf = BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


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
    end_state: str = "closed"


def set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off on the association's socket.

    Small DIMSE messages otherwise wait for the peer's delayed ACK, which caps small-instance
    throughput near 20/s whatever either side does.
    """
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            log.debug("tcp_nodelay.unavailable")


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

    # -- set-up -----------------------------------------------------------------------
    def build_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_associations = node.max_associations
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
        ]

    @property
    def active(self) -> int:
        with self._stats_lock:
            return len(self._stats)

    # -- association lifecycle ----------------------------------------------------------
    def _on_conn_open(self, event: Any) -> None:
        set_nodelay(event)

    def _on_requested(self, event: Any) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        calling = str(rq.calling_ae_title).strip()
        called = str(rq.called_ae_title).strip()
        host, port = assoc.requestor.address, int(assoc.requestor.port)
        reason = self.settings.access.check(calling, host, called, self.settings.node.ae_title)
        with self.sessions.begin() as s:
            row = Association(
                peer_host=host, peer_port=port, calling_ae=calling[:16], called_ae=called[:16],
                accepted=reason is None, reject_reason=reason, started_at=utcnow(),
                instances=0, bytes_received=0, failures=0,
                end_state="rejected" if reason else None,
                ended_at=utcnow() if reason else None,
            )
            s.add(row)
            s.flush()
            if reason:
                record_event(
                    s, _STAGE, "association.rejected", level="warning", association_id=row.id,
                    details={"peer": f"{host}:{port}", "calling_ae": calling, "called_ae": called,
                             "reason": reason},
                )
            row_id = row.id
        if reason:
            log.warning("association.rejected", peer=host, calling_ae=calling, called_ae=called,
                        reason=reason)
            diagnostic = 0x07 if reason.startswith("called") else 0x03
            assoc.acse.send_reject(0x01, 0x01, diagnostic)
            assoc.is_rejected = True
            assoc.kill()
            return
        with self._stats_lock:
            self._stats[id(assoc)] = _AssocStats(row_id=row_id, calling_ae=calling, peer=host)

    def _on_rejected(self, event: Any) -> None:
        # Rejections decided by pynetdicom itself (too many associations, no context).
        stats = self._get(event.assoc)
        if stats is None:
            return
        stats.end_state = "rejected"
        with self.sessions.begin() as s:
            row = s.get(Association, stats.row_id)
            if row is not None:
                row.accepted = False
                row.reject_reason = "rejected by the DICOM layer (association limit or no context)"
                record_event(s, _STAGE, "association.rejected", level="warning",
                             association_id=row.id, details={"reason": row.reject_reason})

    def _on_end(self, event: Any, state: str) -> None:
        stats = self._get(event.assoc)
        if stats is not None and stats.end_state == "closed":
            stats.end_state = state

    def _on_close(self, event: Any) -> None:
        with self._stats_lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None or stats.row_id is None:
            return
        with self.sessions.begin() as s:
            row = s.get(Association, stats.row_id)
            if row is not None:
                row.ended_at = utcnow()
                row.end_state = stats.end_state
                row.instances = stats.instances
                row.bytes_received = stats.bytes
                row.failures = stats.failures
        log.info(
            "association.closed", association_id=stats.row_id, peer=stats.peer,
            calling_ae=stats.calling_ae, end=stats.end_state, instances=stats.instances,
            duplicates=stats.duplicates, failures=stats.failures, echoes=stats.echoes,
            mbytes=round(stats.bytes / 2**20, 3),
            seconds=round(time.monotonic() - stats.started, 3),
        )

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
            try:
                with self.sessions.begin() as s:
                    record_event(s, _STAGE, "instance.failed", level="error",
                                 association_id=assoc_id, error=repr(exc))
            except Exception:  # noqa: BLE001 -- the database itself may be what failed
                log.exception("audit.unavailable")
            status = STATUS_PROCESSING_FAILURE
        if status != STATUS_SUCCESS and stats is not None:
            stats.failures += 1
        return status

    def _store(self, event: Any, assoc_id: int | None, stats: _AssocStats | None) -> int:
        request_uid = str(event.request.AffectedSOPInstanceUID or "")
        data: bytes = event.encoded_dataset(include_meta=False)
        try:
            self.spool.check_space(len(data))
        except IngestError as exc:
            log.error("instance.refused", association_id=assoc_id, status=f"0x{exc.status:04X}",
                      reason=exc.reason)
            with self.sessions.begin() as s:
                record_event(s, _STAGE, "instance.refused", level="error", association_id=assoc_id,
                             sop_instance_uid=request_uid[:64] or None, error=exc.reason)
            return exc.status
        meta: FileMetaDataset = event.file_meta
        if stats is not None:
            meta.SourceApplicationEntityTitle = stats.calling_ae
        sha = hashlib.sha256(data).hexdigest()
        ts = str(meta.TransferSyntaxUID)
        # One Part 10 buffer serves parsing, the spool and the quarantine alike.
        encoded = encode_header(meta) + data
        try:
            info = parse_instance(encoded, ts, request_uid)
        except IngestError as exc:
            return self._quarantine(exc, encoded, sha, ts, request_uid, event, assoc_id)

        # Content-addressed path: writing an identical re-send again is harmless, and it
        # saves a database round trip per instance to check for duplicates only afterwards.
        try:
            path = self.spool.write_instance(info.study_instance_uid, info.sop_instance_uid, sha,
                                             [encoded])
        except IngestError as exc:
            with self.sessions.begin() as s:
                record_event(s, _STAGE, "instance.refused", level="error", association_id=assoc_id,
                             sop_instance_uid=info.sop_instance_uid, error=exc.reason)
            return exc.status
        size = len(encoded)
        rel = str(path.relative_to(self.spool.root))
        outcome = self._record(info, sha, size, rel, assoc_id)
        if stats is not None:
            if outcome == "duplicate":
                stats.duplicates += 1
            else:
                stats.instances += 1
                stats.bytes += size
        return STATUS_SUCCESS

    def _record(self, info: ReceivedInstance, sha: str, size: int, rel: str,
                assoc_id: int | None) -> str:
        """Commit one received instance; returns ``stored``, ``conflict`` or ``duplicate``."""
        now = utcnow()
        with self._db_lock, self.sessions.begin() as s:
            versions = s.execute(select(Instance.version, Instance.sha256).where(
                Instance.sop_instance_uid == info.sop_instance_uid)).all()
            if any(v.sha256 == sha for v in versions):
                record_event(s, _STAGE, "instance.duplicate", association_id=assoc_id,
                             study_instance_uid=info.study_instance_uid,
                             sop_instance_uid=info.sop_instance_uid, details={"sha256": sha})
                return "duplicate"
            study = s.scalar(select(Study).where(Study.study_instance_uid == info.study_instance_uid))
            if study is None:
                study = Study(
                    study_instance_uid=info.study_instance_uid, patient_id=info.patient_id,
                    patient_name=info.patient_name, accession_number=info.accession_number,
                    study_date=info.study_date, study_description=info.study_description,
                    state=StudyState.RECEIVING, first_received_at=now, last_received_at=now,
                    state_changed_at=now, reopen_count=0,
                )
                s.add(study)
                s.flush()
                record_event(s, _STAGE, "study.created", association_id=assoc_id,
                             study_instance_uid=info.study_instance_uid)
            else:
                study.last_received_at = now
                if study.state != StudyState.RECEIVING:
                    if study.state in (StudyState.PROCESSED, StudyState.FAILED):
                        study.reopen_count += 1
                        record_event(s, _STAGE, "study.reopened", association_id=assoc_id,
                                     study_instance_uid=info.study_instance_uid,
                                     details={"previous_state": study.state,
                                              "reopen_count": study.reopen_count})
                    study.state = StudyState.RECEIVING
                    study.state_changed_at = now
            series = s.scalar(select(Series).where(
                Series.series_instance_uid == info.series_instance_uid))
            if series is None:
                series = Series(
                    study_id=study.id, series_instance_uid=info.series_instance_uid,
                    modality=info.modality, body_part=info.body_part,
                    series_number=info.series_number, series_description=info.series_description,
                )
                s.add(series)
                s.flush()
            version = max((v.version for v in versions), default=0) + 1
            s.add(Instance(
                study_id=study.id, series_id=series.id, association_id=assoc_id,
                sop_instance_uid=info.sop_instance_uid, sop_class_uid=info.sop_class_uid,
                transfer_syntax_uid=info.transfer_syntax_uid, version=version, size_bytes=size,
                sha256=sha, spool_path=rel, state=InstanceState.STORED, received_at=now,
            ))
            if versions:
                record_event(
                    s, _STAGE, "instance.conflict", level="warning", association_id=assoc_id,
                    study_instance_uid=info.study_instance_uid,
                    sop_instance_uid=info.sop_instance_uid,
                    details={"version": version, "sha256": sha,
                             "previous_sha256": [v.sha256 for v in versions]},
                )
            else:
                record_event(s, _STAGE, "instance.stored", association_id=assoc_id,
                             study_instance_uid=info.study_instance_uid,
                             sop_instance_uid=info.sop_instance_uid,
                             details={"sha256": sha, "size": size,
                                      "transfer_syntax": info.transfer_syntax_uid})
        if versions:
            log.warning("instance.conflict", study_uid=info.study_instance_uid,
                        sop_uid=info.sop_instance_uid, version=version)
            return "conflict"
        log.debug("instance.stored", study_uid=info.study_instance_uid,
                  sop_uid=info.sop_instance_uid, size=size)
        return "stored"

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
        with self.sessions.begin() as s:
            row = Quarantined(
                received_at=utcnow(), association_id=assoc_id, path=path_str, status=exc.status,
                reason=exc.reason, sop_class_uid=sop_class,
                sop_instance_uid=request_uid[:64] or None,
                size_bytes=len(encoded), sha256=sha,
            )
            s.add(row)
            record_event(s, _STAGE, "instance.quarantined", level="error", association_id=assoc_id,
                         sop_instance_uid=request_uid[:64] or None, error=exc.reason,
                         details={"status": f"0x{exc.status:04X}", "path": path_str})
        log.error("instance.quarantined", association_id=assoc_id, status=f"0x{exc.status:04X}",
                  reason=exc.reason, path=path_str)
        return exc.status
