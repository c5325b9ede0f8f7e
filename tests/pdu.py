"""A raw-socket DICOM upper-layer peer for tests: builds PDUs byte by byte, valid or not.

pynetdicom and dcmtk refuse to send most of what a hostile or broken peer sends (blank AE
titles, no presentation context, a garbled command set); this module writes the PS3.8 PDU
layouts directly so that the tests can.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.7433.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07


def _uid(value: str) -> bytes:
    raw = value.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def item(item_type: int, body: bytes) -> bytes:
    """A variable item: type, reserved byte, 2-byte length, body."""
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def pdu(pdu_type: int, body: bytes) -> bytes:
    """A PDU: type, reserved byte, 4-byte length, body."""
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def presentation_context(context_id: int, abstract: str, syntaxes: list[str]) -> bytes:
    body = struct.pack(">BBBB", context_id, 0, 0, 0) + item(0x30, abstract.encode())
    body += b"".join(item(0x40, ts.encode()) for ts in syntaxes)
    return item(0x20, body)


def user_information(max_pdu: int = 16384) -> bytes:
    return item(0x50, item(0x51, struct.pack(">L", max_pdu)) + item(0x52, IMPLEMENTATION_UID.encode()))


def associate_rq(calling: bytes | str = "RAWSCU", called: bytes | str = "DICOMAI",
                 contexts: list[bytes] | None = None, version: int = 1,
                 extra: bytes | None = None) -> bytes:
    """An A-ASSOCIATE-RQ; AE titles as given (bytes are not padded or checked)."""
    def ae(value: bytes | str) -> bytes:
        raw = value.encode() if isinstance(value, str) else value
        return raw.ljust(16, b" ")[:16]

    if contexts is None:
        contexts = [presentation_context(1, VERIFICATION, [IMPLICIT_LE])]
    body = struct.pack(">HH", version, 0) + ae(called) + ae(calling) + bytes(32)
    body += item(0x10, APPLICATION_CONTEXT.encode()) + b"".join(contexts)
    body += user_information() if extra is None else extra
    return pdu(A_ASSOCIATE_RQ, body)


def _element(group: int, elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, elem, len(value)) + value


def command_set(fields: list[tuple[int, bytes]]) -> bytes:
    """An implicit VR little endian command set with its group length first."""
    body = b"".join(_element(0, e, v) for e, v in fields)
    return _element(0, 0x0000, struct.pack("<L", len(body))) + body


def echo_command(message_id: int = 1) -> bytes:
    """A valid C-ECHO-RQ command set."""
    return command_set([
        (0x0002, _uid(VERIFICATION)), (0x0100, struct.pack("<H", 0x0030)),
        (0x0110, struct.pack("<H", message_id)), (0x0800, struct.pack("<H", 0x0101)),
    ])


def p_data(context_id: int, data: bytes, command: bool = True, last: bool = True) -> bytes:
    """A P-DATA-TF PDU with one PDV."""
    header = struct.pack(">BB", context_id, (1 if command else 0) | (2 if last else 0))
    return pdu(P_DATA_TF, struct.pack(">L", len(data) + 2) + header + data)


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, bytes(4))


@dataclass
class Reply:
    """What the node answered: the first PDU's type (None when the connection just closed)."""

    pdu_type: int | None
    body: bytes = b""

    @property
    def reject(self) -> tuple[int, int, int] | None:
        """(result, source, reason) of an A-ASSOCIATE-RJ."""
        if self.pdu_type != A_ASSOCIATE_RJ:
            return None
        return self.body[1], self.body[2], self.body[3]


def read_pdu(sock: socket.socket) -> Reply:
    """Read one PDU; Reply(None) when the peer closed or reset the connection first."""
    try:
        header = _read_exactly(sock, 6)
        if header is None:
            return Reply(None)
        pdu_type, _, length = struct.unpack(">BBL", header)
        body = _read_exactly(sock, length)
        return Reply(pdu_type, body or b"")
    except ConnectionError:
        return Reply(None)


def _read_exactly(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def exchange(port: int, chunks: list[bytes], timeout: float = 10.0,
             read_after: int | None = None) -> list[Reply]:
    """Connect, send ``chunks`` in order, read every PDU until the node closes (or times out).

    With ``read_after`` set, reads one reply after that many chunks before sending the rest
    (for an A-ASSOCIATE-RQ whose AC must arrive before P-DATA).
    """
    replies: list[Reply] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            for n, chunk in enumerate(chunks):
                if read_after is not None and n == read_after:
                    replies.append(read_pdu(sock))
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        while True:
            try:
                reply = read_pdu(sock)
            except TimeoutError:
                replies.append(Reply(-1))  # still open after ``timeout``: the node hung
                break
            replies.append(reply)
            if reply.pdu_type in (None, A_ASSOCIATE_RJ, A_ABORT, A_RELEASE_RP):
                break
    return replies
