"""Tests of the listener's protections against hostile or broken peers and a failing database."""

from __future__ import annotations

import io
import json
import logging
import socket
import sqlite3
import struct
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from dicomai.config import (
    AccessConfig,
    AllowedCaller,
    LogFormat,
    LoggingConfig,
    NodeConfig,
    Settings,
)
from dicomai.logging import configure_logging
from dicomai.net.listener import Receiver
from dicomai.store import make_engine, open_database
from tests import pdu
from tests.helpers import Node, dcmtk, free_port, make_study, shared_file, storescu
from tests.receiver import serving


def _echo(port: int, calling: str, called: str = "DICOMAI") -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def dead_db_receiver(tmp_path: Path) -> Iterator[int]:
    """An in-process listener with an allow-list whose audit database refuses connections."""
    settings = Settings(node=NodeConfig(data_dir=tmp_path, port=free_port()),
                        access=AccessConfig(allowed_callers=[AllowedCaller(ae_title="GOODPACS")]))
    # Nothing listens on this port: every write to the audit database raises.
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/dicomai")
    with serving(settings, engine):
        yield settings.node.port


@pytest.mark.integration
def test_database_down_fails_closed(dead_db_receiver: int) -> None:
    """With the audit database down, unknown callers and wrong called AEs are still rejected
    and an allowed caller is refused (transient) rather than accepted unaudited."""
    port = dead_db_receiver
    with capture_logs() as logs:
        evil = _echo(port, "EVIL")
        wrong_called = _echo(port, "GOODPACS", called="NOTME")
        allowed = _echo(port, "GOODPACS")
    assert evil.returncode != 0 and "Rejected Permanent" in evil.stderr + evil.stdout, evil.stderr
    assert wrong_called.returncode != 0
    assert "Rejected Permanent" in wrong_called.stderr + wrong_called.stdout, wrong_called.stderr
    assert allowed.returncode != 0 and "Rejected Transient" in allowed.stderr + allowed.stdout, \
        allowed.stderr
    events = [e["event"] for e in logs]
    assert events.count("association.rejected") == 2 and "association.refused" in events


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the other end closes ``sock`` within ``within`` seconds (reading what it sends)."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass  # reset by the peer: closed too
    return True


@pytest.mark.integration
def test_stalled_pdu_headers_do_not_lock_senders_out(node_factory: type[Node], tmp_path: Path) -> None:
    """50 connections that send a PDU header and nothing else are dropped after the ACSE timeout,
    and a real echoscu gets through while they are still open on the peer's side."""
    node = node_factory(data_dir=tmp_path / "data",
                        env_extra={"DICOMAI_NODE__ACSE_TIMEOUT_S": "1",
                                   "DICOMAI_NODE__NETWORK_TIMEOUT_S": "2"}).start()
    stalled = []
    for _ in range(50):
        sock = socket.create_connection(("127.0.0.1", node.port))
        sock.sendall(struct.pack(">BBL", 0x01, 0, 256))  # an A-ASSOCIATE-RQ announced, never sent
        stalled.append(sock)
    try:
        deadline = time.monotonic() + 15
        while (echo := _echo(node.port, "ECHOSCU")).returncode != 0:
            assert time.monotonic() < deadline, f"senders locked out: {echo.stderr}"
            time.sleep(0.5)
        assert all(_closed_by_peer(sock, within=5) for sock in stalled)
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.integration
def test_oversized_pdu_aborts_and_node_stays_responsive(node: Node) -> None:
    """A P-DATA-TF PDU announcing 1.5 GiB (over the advertised 64 KiB) gets an A-ABORT at once,
    is audited, and the node goes on answering."""
    ae = AE(ae_title="HUGEPDU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMAI")
    assert assoc.is_established
    raw = assoc.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 3 * 2**29) + bytes(2**16))
    deadline = time.monotonic() + 10
    while not assoc.is_aborted:
        assert time.monotonic() < deadline, "the node kept reading the oversized PDU"
        time.sleep(0.05)
    assert _echo(node.port, "ECHOSCU").returncode == 0
    node.stop()
    db = sqlite3.connect(node.data_dir / "audit.sqlite3")
    rows = db.execute("select calling_ae, end_state from associations order by id").fetchall()
    assert rows == [("HUGEPDU", "aborted"), ("ECHOSCU", "released")]
    (error,) = db.execute("select error from events where event='association.aborted'").fetchone()
    assert "P-DATA-TF PDU of 1610612736 bytes" in error


@pytest.mark.integration
def test_object_over_max_object_mb_aborts(node_factory: type[Node], tmp_path: Path) -> None:
    """An object larger than node.max_object_mb aborts its association; smaller ones still arrive."""
    node = node_factory(data_dir=tmp_path / "data",
                        env_extra={"DICOMAI_NODE__MAX_OBJECT_MB": "1"}).start()
    _, (big,) = make_study([shared_file("RG2_JPLL.dcm")], tmp_path / "big", dcmtk_encoding=False)
    assert big.stat().st_size > 2**20
    assert storescu(node.port, [big]).returncode != 0
    study_uid, small = make_study([shared_file("dx_image.dcm")], tmp_path / "small")
    assert storescu(node.port, small).returncode == 0
    spooled = list((node.data_dir / "spool").rglob("*.dcm"))
    assert [p.parent.name for p in spooled] == [study_uid]


# -- protocol errors: every association ends with an answer, an end state and a free slot ------
_GARBLED_COMMANDS = [
    b"\x00\x00\x00\x00\xff\xff\xff\xff" + b"x" * 20,  # a group length that runs off the end
    pdu.command_set([(0x0100, b"\x30")]),  # a US value one byte long
    pdu.command_set([(0x0002, b"1.2.3\x00")]),  # no Command Field at all
    bytes(range(64)),  # noise
]


@pytest.mark.integration
def test_malformed_command_sets_abort_and_end_every_association(node_factory: type[Node],
                                                                 tmp_path: Path) -> None:
    """A garbled command set gets an A-ABORT; every association row gets an end state, no
    thread traceback reaches the log, and SIGTERM on the idle node is quick."""
    node = node_factory(data_dir=tmp_path / "data",
                        env_extra={"DICOMAI_NODE__SHUTDOWN_GRACE_S": "30"}).start()
    for command in _GARBLED_COMMANDS:
        replies = pdu.exchange(node.port, [pdu.associate_rq(), pdu.p_data(1, command)], read_after=1)
        assert [r.pdu_type for r in replies] == [pdu.A_ASSOCIATE_AC, pdu.A_ABORT], command
    assert _echo(node.port, "ECHOSCU").returncode == 0
    time.sleep(0.5)  # the last association's close handler
    assert node.proc is not None
    started = time.monotonic()
    assert node.stop() == 0
    took = time.monotonic() - started
    assert took < 5, f"SIGTERM on an idle node took {took:.1f} s"
    db = sqlite3.connect(node.data_dir / "audit.sqlite3")
    ends = db.execute("select end_state from associations order by id").fetchall()
    assert ends == [("aborted",)] * len(_GARBLED_COMMANDS) + [("released",)]
    aborted = db.execute("select error from events where event='association.aborted'").fetchall()
    assert len(aborted) == len(_GARBLED_COMMANDS)
    assert all("command set" in e for (e,) in aborted), aborted
    lines = [line for line in node.log().splitlines() if line.strip()]
    assert all(line.startswith("{") for line in lines), "\n".join(
        line for line in lines if not line.startswith("{"))[:2000]


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[Receiver, int]]:
    """An in-process listener on SQLite (no allow-list), with short timeouts."""
    settings = Settings(node=NodeConfig(data_dir=tmp_path, port=free_port(), acse_timeout_s=3,
                                        network_timeout_s=3, max_associations=10))
    with serving(settings, open_database(f"sqlite:///{tmp_path / 'audit.sqlite3'}")) as rcv:
        yield rcv, settings.node.port


def _rows(tmp_path: Path, n: int) -> list[tuple[str, int, str | None, str | None]]:
    """The association rows, once there are ``n`` (the audit row follows the answer)."""
    db = sqlite3.connect(tmp_path / "audit.sqlite3")
    deadline = time.monotonic() + 5
    while True:
        rows = db.execute("select calling_ae, accepted, end_state, reject_reason "
                          "from associations order by id").fetchall()
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


@pytest.mark.integration
def test_no_acceptable_context_is_rejected(receiver: tuple[Receiver, int], tmp_path: Path) -> None:
    """An association proposing nothing the node supports gets A-ASSOCIATE-RJ, not an AC."""
    _, port = receiver
    unknown = pdu.presentation_context(1, "1.2.3.4.5", [pdu.IMPLICIT_LE])
    wrong_syntax = pdu.presentation_context(3, pdu.VERIFICATION, ["1.2.3.4.6"])
    for contexts in ([unknown], [unknown, wrong_syntax]):
        (reply,) = pdu.exchange(port, [pdu.associate_rq(calling="NOCTX", contexts=contexts)])
        assert reply.reject == (0x01, 0x01, 0x01)  # permanent, service user, no reason given
    rows = _rows(tmp_path, 2)
    assert rows == [("NOCTX", 0, "rejected", "no acceptable presentation context")] * 2


@pytest.mark.integration
def test_blank_ae_titles_are_rejected(receiver: tuple[Receiver, int], tmp_path: Path) -> None:
    """A blank (or unprintable) calling or called AE title gets A-ASSOCIATE-RJ, not A-ABORT."""
    rcv, port = receiver
    cases = [(b"", "DICOMAI", 0x03), (b" " * 16, "DICOMAI", 0x03), ("RAWSCU", b"", 0x07),
             (b"BAD\x01AE", "DICOMAI", 0x03), ("RAWSCU", b"\\\\", 0x07)]
    for calling, called, reason in cases:
        (reply,) = pdu.exchange(port, [pdu.associate_rq(calling=calling, called=called)])
        assert reply.reject == (0x01, 0x01, reason), (calling, called, reply)
    rows = _rows(tmp_path, len(cases))
    assert len(rows) == len(cases)
    assert all(accepted == 0 and end == "rejected" and "AE title" in (why or "")
               for _, accepted, end, why in rows), rows
    assert rcv.active == 0


def test_stdlib_logs_are_structlog_json() -> None:
    """pynetdicom's and pydicom's stdlib records, tracebacks included, come out as JSON lines."""
    out = io.StringIO()
    configure_logging(LoggingConfig(format=LogFormat.JSON), stream=out)
    try:
        raise ValueError("bad PDU")
    except ValueError:
        logging.getLogger("pynetdicom.dul").exception("Unable to decode the received PDU data")
    logging.getLogger("pydicom").critical("critical %s", "thing")
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["event"] for r in records] == ["Unable to decode the received PDU data",
                                             "critical thing"]
    assert records[0]["logger"] == "pynetdicom.dul" and records[0]["level"] == "error"
    assert "ValueError: bad PDU" in records[0]["exception"]


def test_every_log_record_is_one_write() -> None:
    """Each record, ours or a library's, reaches the stream in one write of a whole line, so
    records written from two threads (structlog and the stdlib handler hold different locks)
    can never splice into one line that is not JSON."""

    class Writes(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, text: str) -> int:
            self.calls.append(text)
            return super().write(text)

    out = Writes()
    configure_logging(LoggingConfig(format=LogFormat.JSON), stream=out)
    import structlog

    structlog.get_logger("dicomai.test").info("study.classified", images=2)
    logging.getLogger("pynetdicom").warning("a library's warning")
    assert len(out.calls) == 2
    assert all(call.endswith("\n") and call.count("\n") == 1 for call in out.calls)
    assert [json.loads(call)["event"] for call in out.calls] == ["study.classified", "a library's warning"]


@pytest.mark.integration
def test_concurrent_senders_at_the_association_limit(tmp_path: Path) -> None:
    """10 senders in parallel, each opening associations back to back, against
    max_associations=10: none is refused for a slot still held by a closing association."""
    # The senders and the listener share this process: on a loaded machine the short ACSE
    # deadline of the other tests' listener would time some out, which is not what this tests.
    settings = Settings(node=NodeConfig(data_dir=tmp_path, port=free_port(), acse_timeout_s=30,
                                        network_timeout_s=30, max_associations=10))
    with serving(settings, open_database(f"sqlite:///{tmp_path / 'audit.sqlite3'}")):
        refused = _concurrent_refusals(settings.node.port)
    assert refused == []


def _concurrent_refusals(port: int) -> list[str]:

    def sender(n: int) -> list[str]:
        ae = AE(ae_title=f"SENDER{n}")
        ae.add_requested_context(Verification)
        refused = []
        for _ in range(15):
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
            if not assoc.is_established:
                refused.append("rejected" if assoc.is_rejected else "other")
                continue
            assoc.send_c_echo()
            assoc.release()
        return refused

    with ThreadPoolExecutor(10) as pool:
        return [r for rs in pool.map(sender, range(10)) for r in rs]


@pytest.mark.integration
def test_unexpected_failure_answers_0110_and_keeps_the_object(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure nothing foresaw (here: recording the instance raises) answers 0x0110 and the
    object is kept in quarantine with the reason, audited; the next instance is stored."""
    settings = Settings(node=NodeConfig(data_dir=tmp_path / "data", port=free_port()))
    _, files = make_study([shared_file("dx_image.dcm")], tmp_path / "s", copies=2)
    calls: list[int] = []
    real = Receiver._record

    def record_once_broken(self: Receiver, *args: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("something nobody planned for")
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(Receiver, "_record", record_once_broken)
    with serving(settings, open_database(f"sqlite:///{tmp_path / 'data' / 'audit.sqlite3'}")):
        first = storescu(settings.node.port, files[:1])
        second = storescu(settings.node.port, files[1:])
    assert "0x0110" in first.stdout + first.stderr or first.returncode != 0
    assert second.returncode == 0
    db = sqlite3.connect(tmp_path / "data" / "audit.sqlite3")
    (status, reason, path), = db.execute("select status, reason, path from quarantine").fetchall()
    assert status == 0x0110 and "something nobody planned for" in reason
    assert (tmp_path / "data" / path).is_file()
    assert db.execute("select count(*) from instances").fetchone()[0] == 1
