"""When a study is stable: on release of the associations that sent it, through the real listener."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import TIBIA, Node, make_study, pydicom_data, storescu


@pytest.mark.integration
def test_single_association_study_is_processed_after_release(node_factory: type[Node],
                                                             tmp_path: Path) -> None:
    """A study sent over one association is processed seconds after the association is released,
    not after the (here 60 s) quiet period; a later association re-opens it, and the study ends
    processed with every image classified and a superseding SR."""
    node = node_factory(data_dir=tmp_path / "data", env_extra={
        "DICOMAI_STUDIES__QUIET_PERIOD_S": "60", "DICOMAI_STUDIES__SETTLE_S": "0.3",
        "DICOMAI_MODEL__THREADS": "1"}).start()
    uid, files = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "s", copies=3, body_part=TIBIA)
    sent = time.monotonic()
    assert storescu(node.port, files[:2]).returncode == 0
    first = node.wait_state(uid, "processed", timeout=30)
    assert time.monotonic() - sent < 30
    assert [e["details"]["rule"] for e in first["events"] if e["event"] == "study.stable"] == [
        "associations released"]
    assert storescu(node.port, files[2:]).returncode == 0  # a second association, later
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        study = node.study(uid)
        if study["state"] == "processed" and study["reopen_count"] == 1:
            break
        time.sleep(0.2)
    images = [p for p in study["predictions"] if p["level"] == "image"]
    assert study["state"] == "processed" and len(images) == 3
    assert all(p["grade"] in ("positive", "doubtful", "negative") for p in images)
    srs = [r for r in study["results"] if r["kind"] == "sr"]
    assert len(srs) == 2 and srs[1]["replaces"] == srs[0]["sop_instance_uid"]


@pytest.mark.integration
def test_quiet_period_only_when_release_rule_is_off(node_factory: type[Node], tmp_path: Path) -> None:
    """With studies.on_release off, a released association does not make its study stable."""
    node = node_factory(data_dir=tmp_path / "data", env_extra={
        "DICOMAI_STUDIES__QUIET_PERIOD_S": "60", "DICOMAI_STUDIES__ON_RELEASE": "false"}).start()
    uid, files = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "s")
    assert storescu(node.port, files).returncode == 0
    time.sleep(3)
    assert node.study(uid)["state"] == "receiving"
