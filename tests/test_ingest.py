"""Tests of the listener: parsing rules, and real dcmtk/pynetdicom peers over loopback."""

from __future__ import annotations

import errno
import hashlib
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import AE, _config
from sqlalchemy.exc import OperationalError

from dicomai.config import NodeConfig, Settings, StorageConfig
from dicomai.errors import IngestError
from dicomai.net.dimse import parse_instance
from dicomai.store import ingest, open_database
from tests.helpers import (
    Node,
    dataset_bytes,
    dcmtk,
    free_port,
    make_study,
    mounted_tmpfs,
    pydicom_data,
    shared_file,
    storescu,
)
from tests.receiver import serving

ALL_SOURCES = ["RG2_JPLL.dcm", "RG1_JLSN.dcm", "JPEGExtended_1s_1f_u_16_12.dcm", "dx_image.dcm"]
PYDICOM_SOURCES = ["RG3_UNCR.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm"]


def _sources() -> list[Path]:
    return [shared_file(n) for n in ALL_SOURCES] + [pydicom_data(n) for n in PYDICOM_SOURCES]


def _encoded(path: Path) -> tuple[bytes, str]:
    raw = path.read_bytes()
    return raw, str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)


# -- parse_instance (pure) -----------------------------------------------------------------
def test_parse_real_files() -> None:
    """Every shared radiograph parses with its UIDs and transfer syntax."""
    for path in _sources():
        raw, ts = _encoded(path)
        info = parse_instance(raw, ts, None)
        ds = dcmread(path, stop_before_pixels=True)
        assert info.sop_instance_uid == ds.SOPInstanceUID
        assert info.study_instance_uid == ds.StudyInstanceUID
        assert info.transfer_syntax_uid == ts


@pytest.mark.parametrize("name", ["dx_image.dcm", "RG2_JPLL.dcm"])
def test_parse_truncated(name: str) -> None:
    """A file cut short (native or encapsulated pixel data) is refused with 0xC210."""
    raw, ts = _encoded(shared_file(name))
    with pytest.raises(IngestError) as err:
        parse_instance(raw[: len(raw) - 1000], ts, None)
    assert err.value.status == 0xC210


def test_parse_garbage() -> None:
    """Bytes that are not DICOM are refused with 0xC210."""
    with pytest.raises(IngestError) as err:
        parse_instance(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 20, "1.2.840.10008.1.2.1", None)
    assert err.value.status == 0xC210


def _empty_pixel_data(out: Path) -> Path:
    """dx_image.dcm with a zero-length Pixel Data element."""
    ds = dcmread(shared_file("dx_image.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PixelData = b""
    ds.save_as(out, enforce_file_format=True)
    return out


def _unknown_vr(out: Path) -> Path:
    """dx_image.dcm with the VR of Modality overwritten by the unknown VR ``ZZ``."""
    raw = shared_file("dx_image.dcm").read_bytes()
    at = raw.index(b"\x08\x00\x60\x00CS", 132)
    out.write_bytes(raw[:at + 4] + b"ZZ" + raw[at + 6:])
    return out


@pytest.mark.parametrize("make", [_empty_pixel_data, _unknown_vr])
def test_parse_corrupt_element(make: Any, tmp_path: Path) -> None:
    """An empty Pixel Data element or an unknown VR is refused with 0xC210, not a crash."""
    raw, ts = _encoded(make(tmp_path / "bad.dcm"))
    with pytest.raises(IngestError) as err:
        parse_instance(raw, ts, None)
    assert err.value.status == 0xC210


def test_parse_missing_uid(tmp_path: Path) -> None:
    """A data set without SOP Instance UID is refused with 0xA900."""
    ds = dcmread(shared_file("dx_image.dcm"))
    del ds.SOPInstanceUID
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    with pytest.raises(IngestError) as err:
        parse_instance(buf.getvalue(), str(ds.file_meta.TransferSyntaxUID), None)
    assert err.value.status == 0xA900
    assert "SOPInstanceUID" in err.value.reason


def test_parse_request_mismatch() -> None:
    """A data set whose SOP Instance UID differs from the request is refused (0xA900)."""
    raw, ts = _encoded(shared_file("dx_image.dcm"))
    with pytest.raises(IngestError) as err:
        parse_instance(raw, ts, "1.2.3.4")
    assert err.value.status == 0xA900


# -- through the node, with real peers ---------------------------------------------------------
def _db(node: Node) -> sqlite3.Connection:
    return sqlite3.connect(node.data_dir / "audit.sqlite3")


@pytest.mark.integration
def test_echoscu(node: Node) -> None:
    """dcmtk echoscu gets a success and the association is audited."""
    out = subprocess.run([dcmtk("echoscu"), "-aec", "DICOMAI", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    node.stop()
    rows = _db(node).execute("select calling_ae, accepted, end_state from associations").fetchall()
    assert rows == [("ECHOSCU", 1, "released")]


@pytest.mark.integration
def test_storescu_multi_syntax_study(node: Node, tmp_path: Path) -> None:
    """A study in 9 transfer syntaxes arrives byte-identical, audited, and turns stable."""
    study_uid, files = make_study(_sources(), tmp_path / "study")
    # More syntaxes, made by dcmtk from the small DX: implicit VR, deflate, RLE.
    base = files[ALL_SOURCES.index("dx_image.dcm")]
    for tool, opt, name in [("dcmconv", "+ti", "implicit"), ("dcmconv", "+td", "deflate"),
                            ("dcmcrle", None, "rle")]:
        _, (copy,) = make_study([base], tmp_path / name, study_uid=study_uid)
        out_path = tmp_path / f"{name}.dcm"
        subprocess.run([dcmtk(tool), *([opt] if opt else []), str(copy), str(out_path)], check=True)
        files.append(out_path)
    out = storescu(node.port, files)
    assert out.returncode == 0, out.stderr
    study = node.wait_state(study_uid, "processed")
    assert len(study["instances"]) == len(files)
    by_uid = {i["sop_instance_uid"]: i for i in study["instances"]}
    syntaxes = set()
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        row = by_uid[ds.SOPInstanceUID]
        stored = node.data_dir / row["spool_path"]
        sent = dataset_bytes(f)
        if str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1.99" and len(sent) % 2:
            sent += b"\x00"  # storescu pads an odd-length deflated stream to even length
        assert dataset_bytes(stored) == sent, f"{f.name} differs on disk"
        assert row["sha256"] == hashlib.sha256(sent).hexdigest()
        assert row["transfer_syntax_uid"] == str(ds.file_meta.TransferSyntaxUID)
        syntaxes.add(row["transfer_syntax_uid"])
    assert len(syntaxes) == 9, syntaxes
    events = [e["event"] for e in study["events"]]
    assert events.count("instance.stored") == len(files)
    assert "study.stable" in events and events[-1] == "study.processed"
    stable = next(e for e in study["events"] if e["event"] == "study.stable")
    assert stable["details"]["quiet_for_s"] >= 1.0  # the configured quiet period
    # No patient identifiers in the node's log.
    assert "PID-SECRET-42" not in node.log() and "Test^Patient" not in node.log()


@pytest.mark.integration
def test_allow_list_rejects_and_audits(node_factory: type[Node], tmp_path: Path) -> None:
    """A caller not on the allow-list (or from the wrong host) is rejected and audited."""
    cfg = tmp_path / "dicomai.toml"
    cfg.write_text('[[access.allowed_callers]]\nae_title = "GOODPACS"\nhosts = ["127.0.0.1"]\n'
                   '[[access.allowed_callers]]\nae_title = "FARAWAY"\nhosts = ["10.9.9.9/32"]\n')
    node = node_factory(data_dir=tmp_path / "data", config=cfg)
    node.start()
    echo = dcmtk("echoscu")
    ok = subprocess.run([echo, "-aet", "GOODPACS", "-aec", "DICOMAI", "127.0.0.1", str(node.port)],
                        capture_output=True, text=True)
    bad = subprocess.run([echo, "-aet", "INTRUDER", "-aec", "DICOMAI", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True)
    far = subprocess.run([echo, "-aet", "FARAWAY", "-aec", "DICOMAI", "127.0.0.1", str(node.port)],
                         capture_output=True, text=True)
    wrong_called = subprocess.run([echo, "-aet", "GOODPACS", "-aec", "NOTME", "127.0.0.1",
                                   str(node.port)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert bad.returncode != 0 and "Rejected" in bad.stderr + bad.stdout
    assert far.returncode != 0
    assert wrong_called.returncode != 0
    node.stop()
    rows = _db(node).execute(
        "select calling_ae, called_ae, accepted, reject_reason from associations order by id").fetchall()
    assert rows[0][:3] == ("GOODPACS", "DICOMAI", 1)
    assert rows[1] == ("INTRUDER", "DICOMAI", 0, "calling AE title not on the allow-list")
    assert rows[2] == ("FARAWAY", "DICOMAI", 0, "calling AE title not allowed from this host")
    assert rows[3] == ("GOODPACS", "NOTME", 0, "called AE title not recognised")
    n = _db(node).execute("select count(*) from events where event='association.rejected'").fetchone()
    assert n == (3,)


def _send_file(port: int, path: Path) -> int:
    """Send a Part 10 file as-is (pynetdicom streams it without decoding)."""
    ae = AE(ae_title="RAWSCU")
    meta = read_file_meta_info(path)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMAI")
    assert assoc.is_established
    # Chunked sending streams the file after its meta information without decoding it,
    # so the node sees exactly these bytes.
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        assoc.release()


def _with_meta(meta_from: Path, body: bytes, out: Path) -> Path:
    """A file with valid File Meta Information followed by an arbitrary data set."""
    raw = meta_from.read_bytes()
    group_length = int.from_bytes(raw[140:144], "little")
    out.write_bytes(raw[: 132 + 12 + group_length] + body)
    return out


@pytest.mark.integration
def test_bad_objects_quarantined_node_keeps_serving(node: Node, tmp_path: Path) -> None:
    """Garbage, truncated, UID-less and corrupt objects get failure statuses, are kept, node goes on."""
    src = shared_file("dx_image.dcm")
    garbage = _with_meta(src, bytes(range(256)) * 40, tmp_path / "garbage.dcm")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(src.read_bytes()[:-5000])
    ds = dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    del ds.SOPInstanceUID
    no_uid = tmp_path / "no_uid.dcm"
    ds.save_as(no_uid, enforce_file_format=False)

    empty_pixels = _empty_pixel_data(tmp_path / "empty_pixels.dcm")
    unknown_vr = _unknown_vr(tmp_path / "unknown_vr.dcm")

    assert _send_file(node.port, garbage) == 0xC210
    assert _send_file(node.port, truncated) == 0xC210
    assert _send_file(node.port, no_uid) == 0xA900
    assert _send_file(node.port, empty_pixels) == 0xC210
    assert _send_file(node.port, unknown_vr) == 0xC210

    quarantine = node.data_dir / "quarantine"
    kept = sorted(quarantine.glob("*.dcm"))
    assert len(kept) == 5
    reasons = [json.loads(p.with_suffix(".json").read_text())["reason"] for p in kept]
    assert any("SOPInstanceUID" in r for r in reasons)
    assert any("truncated" in r for r in reasons)
    # What was kept is what was sent.
    sent = {hashlib.sha256(dataset_bytes(p)).hexdigest()
            for p in (garbage, truncated, no_uid, empty_pixels, unknown_vr)}
    assert {hashlib.sha256(dataset_bytes(p)).hexdigest() for p in kept} == sent
    # The copy written to the spool while the object was parsed is gone: only the
    # quarantine keeps it.
    assert not list((node.data_dir / "tmp").iterdir())
    assert not (node.data_dir / "spool").exists() or not any((node.data_dir / "spool").rglob("*.dcm"))

    study_uid, files = make_study([src], tmp_path / "good")
    out = storescu(node.port, files)
    assert out.returncode == 0, out.stderr
    node.wait_state(study_uid, "processed")
    db = _db(node)
    assert db.execute("select count(*) from quarantine").fetchone() == (5,)
    assert db.execute("select count(*) from events where event='instance.quarantined'").fetchone() == (5,)


@pytest.mark.integration
def test_duplicate_is_noop_and_conflict_is_versioned(node: Node, tmp_path: Path) -> None:
    """Same UID + same content: no-op; same UID + other content: new version, audited."""
    study_uid, files = make_study([shared_file("dx_image.dcm")], tmp_path / "s")
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files).returncode == 0  # identical re-send
    changed = dcmread(files[0])
    changed.SeriesDescription = "changed"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    assert storescu(node.port, [changed_path]).returncode == 0
    node.wait_state(study_uid, "processed")
    study = node.study(study_uid)
    versions = sorted((i["sop_instance_uid"], i["version"]) for i in study["instances"])
    assert versions == [(changed.SOPInstanceUID, 1), (changed.SOPInstanceUID, 2)]
    events = [e["event"] for e in study["events"]]
    assert events.count("instance.conflict") == 1
    db = _db(node)
    assert db.execute("select count(*) from events where event='instance.duplicate'").fetchone() == (1,)
    assert len(list((node.data_dir / "spool" / study_uid).glob("*.dcm"))) == 2


@pytest.mark.integration
def test_disk_nearly_full_refuses_with_a700(node_factory: type[Node], tmp_path: Path) -> None:
    """Below the free-space floor the node answers 0xA700 and stores nothing."""
    node = node_factory(data_dir=tmp_path / "data",
                        env_extra={"DICOMAI_STORAGE__MIN_FREE_MB": str(2**40)}).start()
    _, files = make_study([shared_file("dx_image.dcm")], tmp_path / "s")
    assert _send_file(node.port, files[0]) == 0xA700
    assert not list((node.data_dir / "spool").rglob("*.dcm"))
    db = _db(node)
    assert db.execute("select count(*) from events where event='instance.refused'").fetchone() == (1,)


@pytest.mark.integration
def test_association_limit_rejects_and_audits(node_factory: type[Node], tmp_path: Path) -> None:
    """Beyond node.max_associations a new association is rejected (transient) and audited."""
    node = node_factory(data_dir=tmp_path / "data",
                        env_extra={"DICOMAI_NODE__MAX_ASSOCIATIONS": "1",
                                   "DICOMAI_NODE__ACSE_TIMEOUT_S": "2"}).start()
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    # The fixture's TCP readiness probe (a connect without A-ASSOCIATE-RQ) holds the only
    # slot until the ACSE timeout; so would a monitoring probe in a hospital.
    deadline = time.monotonic() + 15
    while not (first := ae.associate("127.0.0.1", node.port, ae_title="DICOMAI")).is_established:
        assert time.monotonic() < deadline, "first association never accepted"
        time.sleep(0.5)
    try:
        second = ae.associate("127.0.0.1", node.port, ae_title="DICOMAI")
        assert second.is_rejected
    finally:
        first.release()
    node.stop()
    rows = _db(node).execute("select accepted, reject_reason from associations order by id").fetchall()
    assert rows[-2] == (1, None)
    assert rows[-1][0] == 0 and "association limit" in rows[-1][1]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB tmpfs: a disk that really fills."""
    with mounted_tmpfs(tmp_path / "tmpfs", 20) as mount:
        yield mount


def _fill(directory: Path) -> None:
    """Write a file until the file system refuses another byte."""
    with open(directory / "filler", "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 2**16)
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.mark.integration
def test_disk_full_answers_a700(node_factory: type[Node], small_tmpfs: Path, tmp_path: Path) -> None:
    """On a full disk (spool and SQLite alike) a C-STORE is refused with 0xA700, not 0x0110,
    and once space is back the node stores again."""
    # The data directory is the mount itself: the node's log goes beside it, off the tmpfs.
    node = node_factory(data_dir=small_tmpfs,
                        env_extra={"DICOMAI_STORAGE__MIN_FREE_MB": "0"}).start()
    _, files = make_study([shared_file("dx_image.dcm")] * 3, tmp_path / "s")
    _fill(small_tmpfs)
    statuses = [_send_file(node.port, f) for f in files[:2]]
    assert statuses == [0xA700, 0xA700]
    assert not list((node.data_dir / "spool").rglob("*.dcm"))
    (small_tmpfs / "filler").unlink()
    assert _send_file(node.port, files[2]) == 0
    assert node.stop() == 0


@pytest.mark.integration
def test_database_full_after_spool_write_answers_a700(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit refused for lack of space after the spool write answers 0xA700 (the spool file
    stays for the orphan sweep at start); any other database error stays 0x0110."""
    def full(*_: object) -> None:
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("database or disk is full"))

    def broken(*_: object) -> None:
        raise OperationalError("INSERT", {}, sqlite3.OperationalError("no such table: instances"))

    settings = Settings(node=NodeConfig(data_dir=tmp_path / "data", port=free_port()),
                        storage=StorageConfig(min_free_mb=0))
    _, files = make_study([shared_file("dx_image.dcm")] * 2, tmp_path / "s")
    engine = open_database(f"sqlite:///{tmp_path / 'audit.sqlite3'}")
    with serving(settings, engine):
        monkeypatch.setattr(ingest, "record_instance", full)
        assert _send_file(settings.node.port, files[0]) == 0xA700
        monkeypatch.setattr(ingest, "record_instance", broken)
        assert _send_file(settings.node.port, files[1]) == 0x0110
    assert len(list((tmp_path / "data" / "spool").rglob("*.dcm"))) == 2
