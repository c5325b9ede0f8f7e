"""Limits on what a peer can make the listener wait for or hold in memory.

pynetdicom reads a PDU by its header's length: it blocks in ``recv`` until every announced
byte has arrived, on an accepted socket without a timeout, and keeps what it read in memory.
A peer that sends a header and then nothing holds an association slot forever (a dozen such
connections lock every sender out); one that announces gigabytes makes the node buffer them.
Its own ACSE and network timers do not help, because they are only looked at between PDUs.

:func:`install` (an ``EVT_CONN_OPEN`` handler's work) wraps the accepted socket in a
:class:`GuardedSocket` before the first byte is read. pynetdicom keeps using the socket as
before; the guard follows the PDU framing of what it reads and closes the connection when

* no byte arrives for ``node.network_timeout_s`` while a PDU is being read,
* the A-ASSOCIATE-RQ has not fully arrived ``node.acse_timeout_s`` after the connection opened,
* a P-DATA-TF PDU is longer than the ``node.max_pdu_size`` the node advertised (A-ABORT),
* one DIMSE message (a C-STORE's data set) grows past ``node.max_object_mb`` (A-ABORT),
* any other PDU is longer than a control PDU can be, or its type is unknown (A-ABORT),
* an A-ASSOCIATE-RQ carries a blank or unprintable AE title (A-ASSOCIATE-RJ: pynetdicom
  cannot decode such a request and would answer it with an A-ABORT).

pynetdicom then sees a closed transport and ends the association as it does when a peer
disconnects: the association is aborted, its handlers run and its slot is freed.

Whatever way an association ends, pynetdicom closes its socket last; the guard reports that
once through ``on_finished``, so the listener can close the association's books even when
pynetdicom fires no closing event.

On the DICOM TLS port the accepted socket is an :class:`ssl.SSLSocket` that has not
handshaken yet (:mod:`dicomai.net.tls`). The guard completes the handshake in the
association's thread before pynetdicom reads, within ``node.acse_timeout_s``: a plain-TCP
peer, or one without an acceptable certificate, is dropped there (``Drop.tls``) before it
sends a PDU or takes an association slot. Every limit above then applies to the decrypted
stream. pynetdicom looks for data TLS has already decrypted only when its socket *is* an
SSLSocket; the guard is not, so the transport is told to ask the guard
(:class:`_TlsTransport`), or a PDU that arrived in the same TLS record as the previous one
would wait for the network timeout.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.transport import AssociationSocket

__all__ = ["Drop", "GuardedSocket", "Limits", "install", "message_received", "peer_certificate"]

_P_DATA_TF = 0x04
_A_ASSOCIATE_RQ = 0x01
_PDU_TYPES = frozenset(range(0x01, 0x08))
# A-ABORT reasons of the service provider (PS3.8 9.3.8).
_NOT_SPECIFIED, _UNRECOGNIZED_PDU, _INVALID_PARAMETER = 0x00, 0x01, 0x06
# A-ASSOCIATE-RJ: rejected permanent, by the service user, calling / called AE not recognised.
_PERMANENT, _SERVICE_USER, _CALLING_AE, _CALLED_AE = 0x01, 0x01, 0x03, 0x07
#: Bytes of an A-ASSOCIATE-RQ body up to the end of the Calling AE Title field.
_RQ_AE_END = 36
#: Slack over the advertised maximum for peers that count a PDV item header into it.
PDU_SLACK = 256
#: The longest non-P-DATA PDU accepted: an A-ASSOCIATE-RQ proposing every storage SOP class
#: with a dozen transfer syntaxes each, plus user identity, stays far below this.
MAX_CONTROL_PDU = 2**20
#: The most one read asks of the socket (pynetdicom's own transport asks for 4 KiB).
_RECV_CHUNK = 2**18


@dataclass(frozen=True)
class Limits:
    """What a peer may ask of the listener; 0 for ``max_pdu_size`` means unlimited."""

    network_timeout_s: float
    acse_timeout_s: float
    max_pdu_size: int
    max_object_bytes: int


@dataclass(frozen=True)
class Drop:
    """Why the guard closed a connection and what it answered the peer.

    ``rejected`` is set when the answer was an A-ASSOCIATE-RJ; ``calling_ae`` and
    ``called_ae`` then hold the request's titles as far as they are printable. ``tls`` is
    set when the peer failed the TLS handshake (no certificate, an untrusted one, not TLS).
    """

    reason: str
    rejected: bool = False
    calling_ae: str = ""
    called_ae: str = ""
    tls: bool = False


#: Called once when the guard closes a connection.
OnClose = Callable[[Drop], None]
#: Called once when pynetdicom closes the socket, however the association ended.
OnFinished = Callable[[], None]


class GuardedSocket:
    """An accepted socket that enforces :class:`Limits` on what pynetdicom reads from it.

    Only pynetdicom's DUL thread reads from it; every other attribute is the socket's own.
    """

    def __init__(self, raw: socket.socket, limits: Limits, on_close: OnClose,
                 on_finished: OnFinished | None = None) -> None:
        self._raw = raw
        self._limits = limits
        self._on_close = on_close
        self._on_finished = on_finished
        self._rq_head = bytearray()
        self._deadline: float | None = time.monotonic() + limits.acse_timeout_s
        self._closed = False
        self._header = bytearray()
        self._body_left = 0
        self._pdu_type = 0
        self._message_bytes = 0
        raw.settimeout(limits.network_timeout_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Read like :meth:`socket.socket.recv`; b"" once the guard has closed the connection."""
        if self._closed:
            return b""
        timeout = self._limits.network_timeout_s
        if self._deadline is not None:
            left = self._deadline - time.monotonic()
            if left <= 0:
                self._close("association not requested within node.acse_timeout_s", abort=False)
                return b""
            timeout = min(timeout, left)
        self._raw.settimeout(timeout)
        try:
            data = self._raw.recv(bufsize, flags)
        except TimeoutError:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._close("association not requested within node.acse_timeout_s", abort=False)
            else:
                self._close("no data within node.network_timeout_s in the middle of a PDU",
                            abort=False)
            return b""
        except ssl.SSLError as exc:  # a forged or corrupted record, an alert from the peer
            self._close(f"TLS error: {_ssl_reason(exc)}", abort=False)
            return b""
        violation = self._follow(data)
        if isinstance(violation, Drop):
            self._reject(violation)
            return b""
        if violation is not None:
            self._close(*violation)
            return b""
        return data

    def handshake(self) -> bool:
        """Complete the TLS handshake of an accepted SSLSocket before ``node.acse_timeout_s``.

        On failure the connection is closed and reported through ``on_close``; False then.
        """
        assert isinstance(self._raw, ssl.SSLSocket)
        assert self._deadline is not None
        self._raw.settimeout(max(self._deadline - time.monotonic(), 0.001))
        try:
            self._raw.do_handshake()
        except TimeoutError:
            self._close("TLS handshake not completed within node.acse_timeout_s", abort=False)
        except (ssl.SSLEOFError, ConnectionError):
            # The peer hung up mid-handshake (a port probe, a client that gave up): like a
            # plain connection closed before its request, nothing to reject.
            self._close("connection closed during the TLS handshake", abort=False)
        except ssl.SSLError as exc:
            self._shut(None, Drop(f"TLS handshake failed: {_ssl_reason(exc)}", tls=True))
        except OSError as exc:
            self._close(f"TLS handshake failed: {exc.strerror or exc}", abort=False)
        else:
            return True
        return False

    def peer_certificate(self) -> dict[str, Any] | None:
        """The peer's verified certificate over TLS (None over plain TCP or without one)."""
        if self._closed or not isinstance(self._raw, ssl.SSLSocket):
            return None
        return self._raw.getpeercert() or None

    def pending(self) -> int:
        """Bytes TLS has decrypted and not handed out yet (0 over plain TCP)."""
        if self._closed or not isinstance(self._raw, ssl.SSLSocket):
            return 0
        return self._raw.pending()

    def message_received(self) -> None:
        """A whole DIMSE message was decoded: the next one starts from zero bytes."""
        self._message_bytes = 0

    def shutdown(self, how: int) -> None:
        if not self._closed:  # the guard already shut it down; a second time raises ENOTCONN
            self._raw.shutdown(how)

    def close(self) -> None:
        self._raw.close()
        finished, self._on_finished = self._on_finished, None
        if finished is not None:
            finished()

    def _follow(self, data: bytes) -> tuple[str, bool, int] | Drop | None:
        """Follow the PDU framing through ``data``; say why to abort or reject, if it must."""
        at = 0
        while at < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - at)
                if self._pdu_type == _A_ASSOCIATE_RQ and len(self._rq_head) < _RQ_AE_END:
                    self._rq_head += data[at:at + min(step, _RQ_AE_END - len(self._rq_head))]
                    if len(self._rq_head) == _RQ_AE_END and (drop := _check_titles(self._rq_head)):
                        return drop
                self._body_left -= step
                at += step
                if not self._body_left:
                    self._pdu_done()
                continue
            step = min(6 - len(self._header), len(data) - at)
            self._header += data[at:at + step]
            at += step
            if len(self._header) < 6:
                continue
            pdu_type, _, length = struct.unpack(">BBL", self._header)
            self._header.clear()
            violation = self._check(pdu_type, length)
            if violation is not None:
                return violation
            self._pdu_type = pdu_type
            self._body_left = length
            if not length:
                self._pdu_done()
        return None

    def _check(self, pdu_type: int, length: int) -> tuple[str, bool, int] | None:
        """Why a PDU with this header must not be read: reason, abort, A-ABORT diagnostic."""
        if pdu_type not in _PDU_TYPES:
            return f"unknown PDU type 0x{pdu_type:02X}", True, _UNRECOGNIZED_PDU
        if pdu_type != _P_DATA_TF:
            if length > MAX_CONTROL_PDU:
                return f"PDU type 0x{pdu_type:02X} of {length} bytes", True, _INVALID_PARAMETER
            return None
        limit = self._limits.max_pdu_size
        if limit and length > limit + PDU_SLACK:
            return (f"P-DATA-TF PDU of {length} bytes, over the advertised maximum of {limit}",
                    True, _INVALID_PARAMETER)
        self._message_bytes += length
        if self._message_bytes > self._limits.max_object_bytes:
            return (f"DIMSE message over node.max_object_mb "
                    f"({self._limits.max_object_bytes // 2**20} MiB)", True, _NOT_SPECIFIED)
        return None

    def _pdu_done(self) -> None:
        if self._pdu_type == _A_ASSOCIATE_RQ:
            self._deadline = None

    def _close(self, reason: str, abort: bool, diagnostic: int = _NOT_SPECIFIED) -> None:
        reply = None
        if abort:
            pdu = A_ABORT_RQ()
            pdu.source = 0x02  # service provider
            pdu.reason_diagnostic = diagnostic
            reply = pdu.encode()
        self._shut(reply, Drop(reason))

    def _reject(self, drop: Drop) -> None:
        pdu = A_ASSOCIATE_RJ()
        pdu.result = _PERMANENT
        pdu.source = _SERVICE_USER
        pdu.reason_diagnostic = _CALLED_AE if drop.reason.startswith("called") else _CALLING_AE
        self._shut(pdu.encode(), drop)

    def _shut(self, reply: bytes | None, drop: Drop) -> None:
        if reply is not None:
            with contextlib.suppress(OSError):  # the peer may be gone; closing is what matters
                self._raw.sendall(reply)
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RDWR)
        self._closed = True
        self._on_close(drop)


class _GuardedTransport(AssociationSocket):
    """pynetdicom's transport, reading a PDU in as few calls as the network allows.

    pynetdicom reads 4 KiB per call, so a 64 KiB P-DATA-TF PDU takes 16 trips through the
    guard's checks and a 7 MB radiograph some 1,700; reading what is there, up to the rest
    of the PDU, takes one or two per PDU on loopback and gives the same bytes.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        guarded = self.socket
        assert guarded is not None
        received = bytearray()
        while len(received) < nr_bytes:
            data = guarded.recv(min(nr_bytes - len(received), _RECV_CHUNK))
            if not data:  # closed, by the peer or the guard: pynetdicom sees a short read
                break
            received += data
        return received


class _TlsTransport(_GuardedTransport):
    """The guarded transport, looking for decrypted TLS data in the guard too (see above)."""

    @property
    def ready(self) -> bool:
        guarded = self.socket
        if isinstance(guarded, GuardedSocket) and guarded.pending():
            return True
        return bool(super().ready)


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason for a failure, readable: "wrong version number", "certificate unknown"."""
    return str(exc.reason or exc.strerror or exc).lower().replace("_", " ")


def _title(raw: bytes | bytearray) -> str | None:
    """An AE title field's text, or None when pynetdicom could not take it (blank, not
    printable ASCII, a backslash)."""
    text = raw.strip(b" ")
    if not text or any(b < 0x20 or b > 0x7E or b == 0x5C for b in text):
        return None
    return text.decode("ascii")


def _printable(raw: bytes | bytearray) -> str:
    return "".join(chr(b) if 0x20 <= b <= 0x7E else "?" for b in raw).strip()


def _check_titles(head: bytes | bytearray) -> Drop | None:
    """The rejection an A-ASSOCIATE-RQ's AE title fields call for, if any."""
    called_raw, calling_raw = head[4:20], head[20:36]
    called, calling = _title(called_raw), _title(calling_raw)
    if called is not None and calling is not None:
        return None
    which = "called" if called is None else "calling"
    return Drop(reason=f"{which} AE title blank or not printable", rejected=True,
                calling_ae=_printable(calling_raw), called_ae=_printable(called_raw))


def install(event: Any, limits: Limits, on_close: OnClose,
            on_finished: OnFinished | None = None) -> None:
    """EVT_CONN_OPEN: wrap the association's accepted socket before anything is read from it;
    on the TLS port, complete the handshake first."""
    transport = event.assoc.dul.socket
    if transport is None or not isinstance(transport.socket, socket.socket):
        return
    guarded = GuardedSocket(transport.socket, limits, on_close, on_finished)
    transport.socket = guarded
    # Same object, same state: only `recv` (and over TLS `ready`) differ.
    if isinstance(guarded._raw, ssl.SSLSocket):
        transport.__class__ = _TlsTransport
        guarded.handshake()
    else:
        transport.__class__ = _GuardedTransport


def peer_certificate(assoc: Any) -> dict[str, Any] | None:
    """The verified client certificate of an association on the TLS port, if it sent one."""
    guarded = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    return guarded.peer_certificate() if isinstance(guarded, GuardedSocket) else None


def message_received(event: Any) -> None:
    """EVT_DIMSE_RECV: reset the guard's count of bytes in the current message."""
    guarded = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if isinstance(guarded, GuardedSocket):
        guarded.message_received()
