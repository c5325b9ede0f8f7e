"""DIMSE helpers shared by the listener and the sender: statuses, transfer syntaxes, sockets,
and parsing a received Part 10 stream into a :class:`~dicomai.store.ingest.ReceivedInstance`."""

from __future__ import annotations

import socket
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

from dicomai.errors import IngestError
from dicomai.store.ingest import ReceivedInstance
from dicomai.store.spool import is_valid_uid

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_DATASET_MISMATCH",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_PROCESSING_FAILURE",
    "STATUS_SUCCESS",
    "TRANSFER_SYNTAXES",
    "UNCOMPRESSED",
    "encode_header",
    "parse_instance",
    "set_nodelay",
]

log = structlog.get_logger("dicomai.net.dimse")

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
    # pydicom decodes an element's value when it is first accessed, so a corrupt element (an
    # unknown VR, an empty Pixel Data) raises in the checks below as well as in dcmread.
    try:
        return _checked(dcmread(BytesIO(encoded)), transfer_syntax, requested_sop_uid)
    except IngestError:
        raise
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise IngestError(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set: {exc}") from exc
    except Exception as exc:  # pydicom raises assorted types on corrupt input
        raise IngestError(STATUS_CANNOT_UNDERSTAND, f"cannot parse data set: {exc!r}") from exc


def _checked(ds: Dataset, transfer_syntax: str, requested_sop_uid: str | None) -> ReceivedInstance:
    uids = {
        k: str(ds.get(k, "") or "").strip()
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    }
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
            got = len(ds.PixelData or b"")  # an empty element reads as None
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
