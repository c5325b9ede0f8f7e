"""Protocol errors pynetdicom does not contain: each ends its association with an A-ABORT.

pynetdicom decodes a DIMSE command set inside its upper-layer state machine, on the DUL
thread. A command set it cannot decode (a group length running off the end, a value of the
wrong length, no Command Field) raises there; the state machine logs it, stops the DUL thread
and re-raises, so the thread dies with a traceback on stderr, the peer gets no A-ABORT and no
association event fires: the association's row keeps no end state and the listener counts it
as active for ever (which also made SIGTERM wait for the whole shutdown grace).

:func:`contain` (an ``EVT_CONN_OPEN`` handler's work) wraps two methods of one association:

* the DIMSE provider's ``receive_primitive``: a message that cannot be decoded becomes
  PS3.8 event 19 (invalid PDU), which pynetdicom answers with an A-ABORT and ends as
  aborted, exactly as it does for a PDU it cannot decode;
* the state machine's ``do_action``, as the net under it: any other exception in an action
  sends the A-ABORT pynetdicom's own DUL loop sends for its errors and stops the threads
  quietly instead of crashing them.

Both report the reason once through ``on_error``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from pynetdicom.pdu import A_ABORT_RQ

__all__ = ["OnError", "contain"]

#: Called with a short reason when an association is aborted for a protocol error.
OnError = Callable[[str], None]

_SERVICE_PROVIDER, _NOT_SPECIFIED = 0x02, 0x00
_INVALID_PDU = "Evt19"


def contain(assoc: Any, on_error: OnError) -> None:
    """Wrap ``assoc``'s DIMSE decoding and state machine actions (see the module docstring)."""
    dimse, dul = assoc.dimse, assoc.dul
    receive = dimse.receive_primitive
    do_action = dul.state_machine.do_action

    def receive_primitive(primitive: Any) -> None:
        try:
            receive(primitive)
        except Exception as exc:  # noqa: BLE001 -- any decoding error is the peer's
            dimse.message = None
            on_error(f"malformed DIMSE command set: {_short(exc)}")
            dul.event_queue.put(_INVALID_PDU)

    def guarded_action(event: str) -> None:
        try:
            do_action(event)
        except Exception as exc:  # noqa: BLE001 -- pynetdicom logged it; end the association
            on_error(f"protocol error in state machine: {_short(exc)}")
            _abort(assoc)

    dimse.receive_primitive = receive_primitive
    dul.state_machine.do_action = guarded_action


def _abort(assoc: Any) -> None:
    """Send an A-ABORT past the state machine and stop both threads (as pynetdicom's DUL does)."""
    pdu = A_ABORT_RQ()
    pdu.source = _SERVICE_PROVIDER
    pdu.reason_diagnostic = _NOT_SPECIFIED
    transport = assoc.dul.socket
    if transport is not None and transport.socket is not None:
        with contextlib.suppress(OSError):  # the peer may be gone; stopping is what matters
            transport.socket.sendall(pdu.encode())
    assoc.is_aborted = True
    assoc.is_established = False
    assoc._kill = True  # noqa: SLF001 -- the flag pynetdicom's own DUL sets on its errors
    assoc.dul.kill_dul()


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}"
