"""Whole-node tests: crash safety, clean shutdown, a real Orthanc as the sending PACS."""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation  # type: ignore[attr-defined]

from tests.helpers import Node, Orthanc, dataset_bytes, make_study, shared_file, storescu


def _send_each(port: int, files: list[Path], on_ack: list[str], after: int | None = None,
               node: Node | None = None) -> None:
    """Send files one association; kill -9 the node at a random moment after `after` acks."""
    ae = AE(ae_title="CRASHSCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
    assert assoc.is_established
    killer: threading.Thread | None = None
    for i, f in enumerate(files):
        if after is not None and i == after and node is not None:
            delay = random.uniform(0.0, 0.03)
            killer = threading.Thread(target=lambda d=delay: (time.sleep(d), node.kill9()))
            killer.start()
        ds = dcmread(f)
        try:
            status = assoc.send_c_store(ds)
        except Exception:
            break
        if status and "Status" in status and status.Status == 0:
            on_ack.append(ds.SOPInstanceUID)
        if not assoc.is_established:
            break
    if killer:
        killer.join()
    if assoc.is_established:
        assoc.release()


@pytest.mark.integration
def test_kill9_mid_send_loses_nothing_acknowledged(node_factory: type[Node], tmp_path: Path) -> None:
    """kill -9 during a multi-instance send; every acked instance survives, resend completes once."""
    data = tmp_path / "data"
    study_uid, files = make_study([shared_file("dx_image.dcm")], tmp_path / "s", copies=40)
    node = node_factory(data_dir=data).start()
    acked: list[str] = []
    _send_each(node.port, files, acked, after=15, node=node)
    assert node.proc is not None and node.proc.returncode == -9
    assert 15 <= len(acked) < len(files), len(acked)

    node2 = node_factory(data_dir=data, port=node.port).start()
    study = node2.study(study_uid)
    stored = {i["sop_instance_uid"]: i for i in study["instances"]}
    by_uid = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    for uid in acked:  # every acknowledged instance is there, complete
        row = stored[uid]
        on_disk = dataset_bytes(data / row["spool_path"])
        assert hashlib.sha256(on_disk).hexdigest() == row["sha256"]
        assert dcmread(data / row["spool_path"]).SOPInstanceUID == uid
    # The sender re-sends everything (the same bytes), as a PACS retrying a failed job does.
    acked_again: list[str] = []
    _send_each(node2.port, files, acked_again)
    assert len(acked_again) == len(files)
    final = node2.wait_state(study_uid, "processed")
    uids = [i["sop_instance_uid"] for i in final["instances"]]
    assert sorted(uids) == sorted(by_uid)  # all 40, none twice
    assert all(i["version"] == 1 for i in final["instances"])
    spooled = list((data / "spool" / study_uid).glob("*.dcm"))
    assert len(spooled) == len(files)


@pytest.mark.integration
def test_sigterm_finishes_in_flight_association(node: Node, tmp_path: Path) -> None:
    """SIGTERM during a send: the running association completes, then the node exits 0."""
    study_uid, files = make_study([shared_file("RG2_JPLL.dcm")], tmp_path / "s", copies=6,
                                  dcmtk_encoding=False)
    result: dict[str, object] = {}

    def send() -> None:
        result["out"] = storescu(node.port, files)

    t = threading.Thread(target=send)
    t.start()
    time.sleep(0.5)
    assert node.proc is not None
    node.proc.terminate()
    t.join()
    assert node.proc.wait(timeout=60) == 0
    out = result["out"]
    assert out.returncode == 0, out.stderr  # type: ignore[attr-defined]
    events = node.log_events()
    closed = [e for e in events if e["event"] == "association.closed"]
    assert closed and closed[-1]["instances"] == len(files)
    assert events[-1]["event"] == "node.stopped"


@pytest.mark.integration
def test_orthanc_forwards_study(node: Node, tmp_path: Path) -> None:
    """A real Orthanc sends a stored study to the node through its REST API."""
    orthanc = Orthanc(tmp_path / "orthanc", {"dicomai": ("DICOMAI", "127.0.0.1", node.port)}).start()
    try:
        study_uid, files = make_study([shared_file("dx_image.dcm"), shared_file("RG2_JPLL.dcm")],
                                      tmp_path / "s")
        for f in files:
            orthanc.post("/instances", f.read_bytes())
        (orthanc_study,) = orthanc.get("/studies")
        job = orthanc.post("/modalities/dicomai/store", {"Resources": [orthanc_study], "Synchronous": True})
        assert job.get("FailedInstancesCount", 0) == 0, job
        study = node.wait_state(study_uid, "processed")
        assert len(study["instances"]) == 2
        assert {i["sop_instance_uid"] for i in study["instances"]} == {
            dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        db = json.loads(node.cli("studies", "list", "--json").stdout)
        assert db[0]["study_instance_uid"] == study_uid
        echo = node.cli("echo", "--host", "127.0.0.1", "--port", str(orthanc.dicom_port),
                        "--ae-title", "ORTHANC")
        assert "status 0x0000" in echo.stdout
    finally:
        orthanc.stop()


def test_sd_notify_ready_and_stopping(node_factory: type[Node], tmp_path: Path) -> None:
    """Under systemd (NOTIFY_SOCKET set) the node reports READY=1, then STOPPING=1."""
    import socket as _socket

    sock_path = tmp_path / "notify.sock"
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    try:
        node = node_factory(data_dir=tmp_path / "data", env_extra={"NOTIFY_SOCKET": str(sock_path)})
        node.start()
        assert sock.recv(256) == b"READY=1"
        assert node.stop() == 0  # a clean exit, not killed by a SIGTERM that beat the handlers
        assert sock.recv(256) == b"STOPPING=1"
    finally:
        sock.close()


_HEAP_SCRIPT = """
import sys
from dicomai.node import return_free_memory

def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

# 300 MB in blocks under glibc's mmap threshold: they come from the heap. The block kept
# last sits at the heap's top, so freeing the others leaves them in the process.
blocks = [bytearray(100_000) for _ in range(3000)]
keep = bytearray(100_000)
del blocks
before = resident_mb()
trimmed = return_free_memory()
print(before, resident_mb(), trimmed)
"""


def test_freed_heap_goes_back_to_the_system(tmp_path: Path) -> None:
    """After a study the node gives the C heap's free pages back (glibc's malloc_trim): a
    process that freed 300 MB of heap blocks below one still in use shrinks by most of it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], capture_output=True, text=True,
                         check=True, timeout=60)
    before, after, trimmed = out.stdout.split()
    assert trimmed == "True"
    assert float(before) - float(after) > 200, out.stdout
