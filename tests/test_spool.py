"""Tests of the durable spool's file operations."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from dicomai.errors import SpoolFullError
from dicomai.store import spool as spool_module
from dicomai.store.spool import Spool, is_valid_uid


def test_write_is_content_addressed_and_complete(tmp_path: Path) -> None:
    """An instance lands at spool/<study>/<sop>.<sha16>.dcm with exactly its bytes."""
    spool = Spool(tmp_path)
    spool.prepare()
    path = spool.write_instance("1.2.3", "1.2.3.4", "ab" * 32, [b"head", b"body"])
    assert path == tmp_path / "spool" / "1.2.3" / f"1.2.3.4.{'ab' * 8}.dcm"
    assert path.read_bytes() == b"headbody"
    assert not list(spool.tmp_dir.iterdir())


def test_new_study_folder_is_durable_before_any_file_placed_in_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two associations storing the first instances of one study at once: the second must not
    return (and acknowledge) before the study folder's entry in spool/ is fsynced, however
    long the first one's fsync of spool/ takes."""
    spool = Spool(tmp_path)
    spool.prepare()
    events: list[str] = []
    real_fsync_dir = spool_module._fsync_dir

    def slow_fsync_dir(path: Path) -> None:
        if path == spool.spool_dir:
            events.append("spool/ fsync started")
            time.sleep(0.3)
            events.append("spool/ fsync done")
        real_fsync_dir(path)

    monkeypatch.setattr(spool_module, "_fsync_dir", slow_fsync_dir)
    first = spool.write_temp([b"first"])
    second = spool.write_temp([b"second"])
    study = spool.spool_dir / "1.2.3"
    writer = threading.Thread(target=spool.place, args=(first, study / "a.dcm"))
    writer.start()
    while "spool/ fsync started" not in events:
        time.sleep(0.001)
    spool.place(second, study / "b.dcm")
    events.append("second placed")
    writer.join()
    assert events.index("spool/ fsync done") < events.index("second placed")
    assert (study / "a.dcm").read_bytes() == b"first"
    assert (study / "b.dcm").read_bytes() == b"second"


def test_unsafe_uid_never_becomes_a_path(tmp_path: Path) -> None:
    """UIDs that could escape the spool are refused."""
    assert not is_valid_uid("../../etc")
    assert not is_valid_uid("1.2." + "3" * 70)
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.1")
    with pytest.raises(ValueError):
        Spool(tmp_path).instance_path("..", "1.2", "00" * 32)


def test_prepare_removes_partial_writes(tmp_path: Path) -> None:
    """Partial files left in tmp/ by a crash are removed at start."""
    spool = Spool(tmp_path)
    spool.prepare()
    (spool.tmp_dir / "x.part").write_bytes(b"partial")
    assert spool.prepare() == 1
    assert not list(spool.tmp_dir.iterdir())


def test_check_space_raises_a700(tmp_path: Path) -> None:
    """Below the free-space floor the spool refuses with out-of-resources."""
    Spool(tmp_path, min_free_bytes=0).check_space()
    with pytest.raises(SpoolFullError) as err:
        Spool(tmp_path, min_free_bytes=2**62).check_space()
    assert err.value.status == 0xA700


def test_quarantine_keeps_bytes_and_reason(tmp_path: Path) -> None:
    """A quarantined object keeps its bytes and a JSON sidecar with the reason."""
    spool = Spool(tmp_path)
    spool.prepare()
    path = spool.quarantine([b"garbage"], "cd" * 32, {"reason": "cannot parse"})
    assert path.read_bytes() == b"garbage"
    assert json.loads(path.with_suffix(".json").read_text())["reason"] == "cannot parse"


def test_private_modes_whatever_the_umask(tmp_path: Path) -> None:
    """Folders are created 0700 and files 0600 even under umask 0."""
    old = os.umask(0)
    try:
        spool = Spool(tmp_path / "data")
        spool.prepare()
        written = [spool.write_instance("1.2.3", "1.2.3.4", "ab" * 32, [b"x"]),
                   spool.quarantine([b"garbage"], "cd" * 32, {"reason": "cannot parse"})]
    finally:
        os.umask(old)
    folders = [spool.root, spool.spool_dir, spool.quarantine_dir, spool.tmp_dir, written[0].parent]
    assert {oct(stat.S_IMODE(d.stat().st_mode)) for d in folders} == {"0o700"}
    files = [*written, written[1].with_suffix(".json")]
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {"0o600"}
