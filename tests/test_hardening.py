"""Tests of the listener's protections against hostile or broken peers and a failing database."""

from __future__ import annotations

import socket
import sqlite3
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from structlog.testing import capture_logs

from dicomai.config import AccessConfig, AllowedCaller, NodeConfig, Settings
from dicomai.net.listener import Receiver
from dicomai.store import make_engine, make_sessionmaker
from dicomai.store.spool import Spool
from tests.helpers import Node, dcmtk, free_port, make_study, shared_file, storescu


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
    spool = Spool(tmp_path)
    spool.prepare()
    receiver = Receiver(settings, spool, make_sessionmaker(engine))
    ae = receiver.build_ae()
    ae.start_server(("127.0.0.1", settings.node.port), block=False, evt_handlers=receiver.handlers())
    try:
        yield settings.node.port
    finally:
        deadline = time.monotonic() + 5  # let the refused associations see their peers go
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        ae.shutdown()
        engine.dispose()


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
