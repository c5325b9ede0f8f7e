"""Limits on what a peer can make the listener wait for.

pynetdicom reads a PDU by its header's length: it blocks in ``recv`` until every announced
byte has arrived, on an accepted socket without a timeout. A peer that sends a header and
then nothing holds an association slot forever (a dozen such connections lock every sender
out). Its own ACSE and network timers do not help: they are only looked at between PDUs.

:func:`install` (an ``EVT_CONN_OPEN`` handler's work) wraps the accepted socket in a
:class:`GuardedSocket` before the first byte is read. pynetdicom keeps using the socket as
before; the guard follows the PDU framing of what it reads and closes the connection when

* no byte arrives for ``node.network_timeout_s`` while a PDU is being read,
* the A-ASSOCIATE-RQ has not fully arrived ``node.acse_timeout_s`` after the connection opened.

pynetdicom then sees a closed transport and ends the association as it does when a peer
disconnects: the association is aborted, its handlers run and its slot is freed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["GuardedSocket", "Limits", "install"]

_A_ASSOCIATE_RQ = 0x01


@dataclass(frozen=True)
class Limits:
    """How long a peer may make the listener wait."""

    network_timeout_s: float
    acse_timeout_s: float


#: Called once when the guard closes a connection, with the reason.
OnClose = Callable[[str], None]


class GuardedSocket:
    """An accepted socket that enforces :class:`Limits` on what pynetdicom reads from it.

    Only pynetdicom's DUL thread reads from it; every other attribute is the socket's own.
    """

    def __init__(self, raw: socket.socket, limits: Limits, on_close: OnClose) -> None:
        self._raw = raw
        self._limits = limits
        self._on_close = on_close
        self._deadline: float | None = time.monotonic() + limits.acse_timeout_s
        self._closed = False
        self._header = bytearray()
        self._body_left = 0
        self._pdu_type = 0
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
                self._close("association not requested within node.acse_timeout_s")
                return b""
            timeout = min(timeout, left)
        self._raw.settimeout(timeout)
        try:
            data = self._raw.recv(bufsize, flags)
        except TimeoutError:
            if self._deadline is not None and time.monotonic() >= self._deadline:
                self._close("association not requested within node.acse_timeout_s")
            else:
                self._close("no data within node.network_timeout_s in the middle of a PDU")
            return b""
        self._follow(data)
        return data

    def shutdown(self, how: int) -> None:
        if not self._closed:  # the guard already shut it down; a second time raises ENOTCONN
            self._raw.shutdown(how)

    def close(self) -> None:
        self._raw.close()

    def _follow(self, data: bytes) -> None:
        """Follow the PDU framing through ``data``."""
        at = 0
        while at < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - at)
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
            self._pdu_type = pdu_type
            self._body_left = length
            if not length:
                self._pdu_done()

    def _pdu_done(self) -> None:
        if self._pdu_type == _A_ASSOCIATE_RQ:
            self._deadline = None

    def _close(self, reason: str) -> None:
        with contextlib.suppress(OSError):
            self._raw.shutdown(socket.SHUT_RDWR)
        self._closed = True
        self._on_close(reason)


def install(event: Any, limits: Limits, on_close: OnClose) -> None:
    """EVT_CONN_OPEN: wrap the association's accepted socket before anything is read from it."""
    transport = event.assoc.dul.socket
    if transport is not None and isinstance(transport.socket, socket.socket):
        transport.socket = GuardedSocket(transport.socket, limits, on_close)

