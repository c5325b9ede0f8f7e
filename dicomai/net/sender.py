"""The C-STORE SCU: one association per batch of result objects to one destination.

Pure DIMSE: it reports each object's outcome through a callback as soon as the peer answers
(so a node stopped mid-batch keeps what was settled) and touches no database.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.pdu_primitives import A_ASSOCIATE

from dicomai.config import Destination, NodeConfig
from dicomai.net.dimse import set_nodelay
from dicomai.net.tls import client_context

__all__ = ["Attempt", "Batch", "send_batch", "send_chunked", "tls_args"]


@dataclass(frozen=True)
class Attempt:
    """What became of one object: ``permanent`` means retrying cannot help."""

    status: int | None  # the C-STORE status, when the peer answered
    error: str | None  # why no status was read; None when the peer answered
    permanent: bool = False
    peer: str = ""  # AE@host:port
    comment: str | None = None  # the peer's Error Comment


@dataclass(frozen=True)
class Batch:
    attempted: int
    association_error: str | None = None  # set when no association was established


def send_chunked() -> None:
    """Send result files straight from disk in chunks instead of decoding each into memory
    (a 2048 px RGB Secondary Capture is 12 MB). pynetdicom only has a process-wide switch;
    the node sets it once at start."""
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True


def tls_args(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for ``dest``: None unless it has ``tls = true``."""
    return (client_context(dest), dest.tls_server_name) if dest.tls else None


def send_batch(node: NodeConfig, dest: Destination, files: Sequence[tuple[Path, str]],
               report: Callable[[int, Attempt], None], stop: threading.Event | None = None) -> Batch:
    """C-STORE ``files`` ((path, SOP Class UID), in order) over one association; ``report(i,
    attempt)`` is called for each file attempted."""
    ae = AE(ae_title=node.ae_title)
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    for sop_class, syntaxes in _contexts(files).items():
        # A compressed file's syntax in a context of its own, as storescu does: a peer that
        # takes it gets the file as it is; one that does not still takes the uncompressed one.
        for syntax in syntaxes:
            ae.add_requested_context(sop_class, syntax)
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    answers: list[A_ASSOCIATE] = []  # the peer's A-ASSOCIATE-AC or -RJ

    def _on_acse(event: Any) -> None:
        if isinstance(event.primitive, A_ASSOCIATE) and event.primitive.result is not None:
            answers.append(event.primitive)

    opened: list[bool] = []
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, set_nodelay),
                           (evt.EVT_CONN_OPEN, lambda _e: opened.append(True)),
                           (evt.EVT_ACSE_RECV, _on_acse)]
    tls = tls_args(dest)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=node.max_pdu_size,
                         evt_handlers=handlers, tls_args=tls)
    if not assoc.is_established and opened and not answers:
        # Connected, but no answer seen: a peer that rejects and closes at once can race
        # pynetdicom's reading of the A-ASSOCIATE-RJ (seen with Orthanc). Ask once more
        # so that a permanent rejection is recognised on this attempt.
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, max_pdu=node.max_pdu_size,
                             evt_handlers=handlers, tls_args=tls)
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if not assoc.is_established:
        rj = answers[0] if answers else None
        if rj is not None and rj.result in (1, 2):
            attempt = Attempt(None, f"association rejected by {where} ({rj.result_str}, {rj.source_str}): "
                                    f"{rj.reason_str}", permanent=rj.result == 1)
        elif rj is not None:  # accepted, but not one presentation context: pynetdicom aborts
            attempt = Attempt(None, f"{where} accepted no presentation context for these objects", True)
        else:
            why = "connection refused or timed out"
            if tls is not None:
                why += f", or the TLS handshake failed (certificate not trusted or not naming " \
                       f"{dest.tls_server_name})"
            attempt = Attempt(None, f"cannot associate with {where} ({why})")
        for n in range(len(files)):
            report(n, attempt)
        return Batch(len(files), attempt.error)
    attempted = 0
    try:
        for n, (path, sop_class) in enumerate(files):
            if stop is not None and stop.is_set():
                break
            attempted += 1
            if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
                report(n, Attempt(None, f"{where} accepted no presentation context for SOP class "
                                        f"{sop_class}", permanent=True))
                continue
            if not path.is_file():
                report(n, Attempt(None, f"result file missing: {path}", permanent=True))
                continue
            try:
                status = _store(assoc, path)
            except ValueError as exc:  # no accepted context fits, even after conversion
                report(n, Attempt(None, f"C-STORE not sent to {where}: {exc}", permanent=True))
                continue
            except (OSError, RuntimeError) as exc:  # file unreadable now / association gone
                report(n, Attempt(None, f"C-STORE not sent to {where}: {exc}"))
                break
            if not status or "Status" not in status:
                report(n, Attempt(None, f"no C-STORE response from {where} (timeout or abort)"))
                break
            comment = str(status.ErrorComment) if "ErrorComment" in status else None
            report(n, Attempt(int(status.Status), None, peer=where, comment=comment))
    finally:
        if assoc.is_established:
            assoc.release()
    return Batch(attempted)


def _contexts(files: Sequence[tuple[Path, str]]) -> dict[str, list[str]]:
    """Per SOP class, the compressed transfer syntaxes of its files (read from the File Meta
    Information only); an unreadable file is left to the store attempt to report."""
    contexts: dict[str, list[str]] = {}
    for path, sop_class in files:
        syntaxes = contexts.setdefault(sop_class, [])
        try:
            syntax = read_file_meta_info(path).TransferSyntaxUID
        except (OSError, InvalidDicomError, AttributeError):
            continue
        if syntax.is_compressed and syntax not in syntaxes:
            syntaxes.append(syntax)
    return contexts


def _store(assoc: Any, path: Path) -> Any:
    """C-STORE streamed from the file (no decoding, little memory); when the peer took none of
    our syntaxes as it is in the file, decode (decompress: a peer that refused the compressed
    syntax gets the pixels uncompressed) and let pynetdicom convert."""
    try:
        return assoc.send_c_store(path)
    except ValueError:
        ds = dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        return assoc.send_c_store(ds)
