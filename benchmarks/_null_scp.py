"""A pynetdicom C-STORE SCP that keeps nothing: the network layer's own ceiling.

Same contexts, PDU size and TCP_NODELAY as the node; the handler only takes the received
bytes and answers success. Used by benchmarks/ingest.py as a reference column.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicomai.net.dimse import TRANSFER_SYNTAXES


def _open(event: Any) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _store(event: Any) -> int:
    event.encoded_dataset(include_meta=False)
    return 0x0000


def main() -> None:
    ae = AE(ae_title="NULLSCP")
    ae.maximum_pdu_size = 65536
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", int(sys.argv[1])),
                    evt_handlers=[(evt.EVT_C_STORE, _store), (evt.EVT_CONN_OPEN, _open)])


if __name__ == "__main__":
    main()
