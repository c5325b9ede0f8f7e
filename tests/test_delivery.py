"""Results back to the PACS: SC and SR made by the node, delivered to a real Orthanc.

Each test starts the node (shipped model) and, where it needs one, Orthanc on free loopback
ports; the node's outbox is driven only through DICOM, its CLI and its audit database.
"""

from __future__ import annotations

import io
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomai.deliver.outbox import Outcome, backoff_s, status_outcome
from dicomai.model.grading import Grade, grade_label
from dicomai.results.sc import SC_SERIES_DESCRIPTION
from tests.helpers import (
    TIBIA,
    Node,
    Orthanc,
    dcmtk,
    free_port,
    make_study,
    pydicom_data,
    shared_file,
    storescu,
)
from tests.test_results import _dciodvfy

_FRACTURE = "125605004"
_PROBABILITY = "122157"
_GRADE_CODE = {"positive": "52101004", "doubtful": "82334004", "negative": "272519000"}  # SCT Present etc.


def _config(path: Path, orthanc_port: int, outputs: str = '["sc", "sr"]', extra: str = "",
            results: str = "keep = []") -> Path:
    """A node configuration with Orthanc as the destination (``extra``: more ``[outbox]`` keys);
    by default the node makes only the objects the destination asks for (``results.keep = []``)."""
    path.write_text(f"""
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {orthanc_port}
outputs = {outputs}

[outbox]
poll_interval_s = 0.5
initial_backoff_s = 0.5
max_backoff_s = 1.0
{extra}

[results]
{results}
""")
    return path


def _two_views(tmp_path: Path) -> tuple[str, list[Path]]:
    """A study of two views the model analyses: RG3 (a tibia) and RG2 (a hip)."""
    uid, tibia = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "study", body_part=TIBIA)
    _, hip = make_study([shared_file("RG2_JPLL.dcm")], tmp_path / "study", study_uid=uid)
    return uid, tibia + hip


def _outbox(node: Node, *args: str) -> list[dict[str, Any]]:
    import json

    return json.loads(node.cli("outbox", "list", "--json", *args).stdout)  # type: ignore[no-any-return]


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def _download(orthanc: Orthanc, instance_id: str) -> Dataset:
    with urllib.request.urlopen(orthanc.url(f"/instances/{instance_id}/file"), timeout=30) as rsp:
        return dcmread(io.BytesIO(rsp.read()))


def _walk(items: Any) -> list[Dataset]:
    out: list[Dataset] = []
    for item in items:
        out.append(item)
        if "ContentSequence" in item:
            out += _walk(item.ContentSequence)
    return out


def _sr_groups(sr: Dataset) -> list[dict[str, Any]]:
    """Per TID 1501 group: referenced SOP instances, finding value and probability."""
    groups = []
    for item in _walk(sr.ContentSequence):
        if item.ConceptNameCodeSequence[0].CodeValue != "125007":  # Measurement Group
            continue
        content = _walk(item.ContentSequence)
        refs = [c.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for c in content
                if c.ValueType == "IMAGE"]
        finding = [c.ConceptCodeSequence[0].CodeValue for c in content if c.ValueType == "CODE"
                   and c.ConceptNameCodeSequence[0].CodeValue == _FRACTURE]
        prob = [float(c.MeasuredValueSequence[0].NumericValue) for c in content if c.ValueType == "NUM"
                and c.ConceptNameCodeSequence[0].CodeValue == _PROBABILITY]
        ident = [c.TextValue for c in content if c.ValueType == "TEXT"
                 and c.ConceptNameCodeSequence[0].CodeValue == "112039"]  # Tracking Identifier
        region = [list(c.GraphicData) for c in content if c.ValueType == "SCOORD"]
        groups.append({"refs": refs, "finding": finding[0] if finding else None,
                       "probability": prob[0] if prob else None, "id": ident[0] if ident else None,
                       "region": region[0] if region else None})
    return groups


def _study_result(sr: Dataset) -> tuple[str, str]:
    """The report-level qualitative evaluation: the study's finding value and its comment."""
    (container,) = [item for item in sr.ContentSequence if item.ValueType == "CONTAINER"
                    and item.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    finding = [c.ConceptCodeSequence[0].CodeValue for c in container.ContentSequence
               if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeValue == _FRACTURE]
    comment = [c.TextValue for c in container.ContentSequence if c.ValueType == "TEXT"]
    return finding[0], comment[0]


def test_status_outcomes_and_backoff() -> None:
    """Success/warning -> sent; object refused -> dead; resources/processing failure -> retry."""
    assert status_outcome(0x0000) == Outcome.SENT
    assert status_outcome(0xB000) == Outcome.SENT  # coercion of data elements: a warning
    assert status_outcome(0x0122) == Outcome.DEAD  # SOP class not supported
    assert status_outcome(0xA900) == Outcome.DEAD  # data set does not match SOP class
    assert status_outcome(0xC000) == Outcome.DEAD  # cannot understand
    assert status_outcome(0xA700) == Outcome.RETRY  # out of resources
    assert status_outcome(0x0110) == Outcome.RETRY  # processing failure
    delays = [backoff_s(n, 10, 900, rng=lambda: 1.0) for n in range(1, 10)]
    assert delays[:4] == [10, 20, 40, 80] and delays[-1] == 900
    assert backoff_s(3, 10, 900, rng=lambda: 0.0) == 20  # jitter keeps at least half the delay


def test_results_reach_orthanc(node_factory: type[Node], tmp_path: Path, db_url: str) -> None:
    """Orthanc forwards a two-view study; 2 SC (JPEG-LS lossless), 1 SR, 2 GSPS and, for a
    positive study, a KOS come back into the same study.

    The SR's findings and probabilities equal the audit database; every object the node wrote
    passes dciodvfy without errors; the SC renders (dcmj2pnm) with caption band and heat map;
    each GSPS and the KOS reference the study's own images.
    """
    orthanc = Orthanc(tmp_path / "orthanc", {})
    node = node_factory(data_dir=tmp_path / "data", db_url=db_url,
                        config=_config(tmp_path / "n.toml", orthanc.dicom_port,
                                       outputs='["sc", "sr", "gsps", "kos"]'))
    orthanc.modalities = {"dicomai": ("DICOMAI", "127.0.0.1", node.port)}
    orthanc.start()
    try:
        node.start()
        study_uid, files = _two_views(tmp_path)
        for f in files:
            orthanc.post("/instances", f.read_bytes())
        (orthanc_study,) = orthanc.get("/studies")
        job = orthanc.post("/modalities/dicomai/store", {"Resources": [orthanc_study], "Synchronous": True})
        assert job.get("FailedInstancesCount", 0) == 0, job
        _wait(lambda: (len(_outbox(node)) >= 5 and {r["state"] for r in _outbox(node)} == {"sent"}), 90,
              "SC, SC, SR, GSPS, GSPS (and a KOS) sent")
        positive = node.study(study_uid)["grade"] == "positive"
        series = orthanc.study_series(study_uid)
        by_desc = {x["MainDicomTags"].get("SeriesDescription", ""): x for x in series}
        modalities = sorted(x["MainDicomTags"]["Modality"] for x in series)
        # the sources, the SR, the KOS; the SCs and the GSPS in a series per laterality
        assert [m for m in modalities if m not in ("PR", "OT")] == ["CR", "CR"] + ["KO"] * positive + ["SR"]
        sc_series = [x for x in series if x["MainDicomTags"]["Modality"] == "OT"]
        assert {x["MainDicomTags"]["SeriesDescription"] for x in sc_series} == {SC_SERIES_DESCRIPTION}
        (sr_desc,) = [d for d, x in by_desc.items() if x["MainDicomTags"]["Modality"] == "SR"]
        assert len(by_desc[sr_desc]["Instances"]) == 1
        sr = _download(orthanc, by_desc[sr_desc]["Instances"][0])
        scs = [_download(orthanc, i) for x in sc_series for i in x["Instances"]]
        assert len(scs) == 2
        for x in sc_series:  # one laterality per series
            assert len({_download(orthanc, i).get("Laterality", "") for i in x["Instances"]}) == 1
        originals = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
        for ds in [sr, *scs]:
            assert ds.StudyInstanceUID == study_uid and ds.PatientID == "PID-SECRET-42"
        assert {sc.SourceImageSequence[0].ReferencedSOPInstanceUID for sc in scs} == set(originals)
        assert {sc.file_meta.TransferSyntaxUID for sc in scs} == {"1.2.840.10008.1.2.4.80"}  # JPEG-LS

        # The presentation states and the key objects, as Orthanc keeps them.
        states = [_download(orthanc, i) for x in series if x["MainDicomTags"]["Modality"] == "PR"
                  for i in x["Instances"]]
        assert len(states) == 2
        shown = {ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID
                 for ds in states}
        assert shown == set(originals) and all(ds.StudyInstanceUID == study_uid for ds in states)
        kos_series = [x for x in series if x["MainDicomTags"]["Modality"] == "KO"]
        assert len(kos_series) == positive
        for ko in kos_series:
            (kos,) = [_download(orthanc, i) for i in ko["Instances"]]
            keys = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in kos.ContentSequence
                    if i.ValueType == "IMAGE"}
            assert keys and keys <= set(originals)

        # The SR says what the audit database says.
        db = node.study(study_uid)
        images = {p["sop_instance_uid"]: p for p in db["predictions"] if p["level"] == "image"}
        (study_row,) = [p for p in db["predictions"] if p["level"] == "study"]
        assert sr_desc == f"AI fracture: {grade_label(Grade(study_row['grade']))}"
        sc_of = {sc.SourceImageSequence[0].ReferencedSOPInstanceUID: sc.SOPInstanceUID for sc in scs}
        groups = _sr_groups(sr)
        per_image = [g for g in groups if g["id"] != "study"]
        assert len(per_image) == 2
        for g in per_image:
            source = g["refs"][0]  # the source image first; the SC as the illustration
            assert set(g["refs"]) == {source, sc_of[source]}
            assert g["finding"] == _GRADE_CODE[images[source]["grade"]]
            # `studies show` rounds to 3 decimals, the SR to 4
            assert g["probability"] == pytest.approx(images[source]["probability"], abs=5e-4)
        finding, comment = _study_result(sr)
        assert finding == _GRADE_CODE[study_row["grade"]]
        assert comment.startswith("highest image probability ")
        assert float(comment.split()[-1]) == pytest.approx(study_row["probability"], abs=0.006)
        assert sr.VerificationFlag == "UNVERIFIED"

        # Delivered once each, on the first attempt; the files the node kept are valid DICOM.
        rows = _outbox(node)
        assert sorted(r["kind"] for r in rows) == ["gsps", "gsps"] + ["kos"] * positive + ["sc", "sc", "sr"]
        assert all(r["state"] == "sent" and r["attempts"] == 1 for r in rows), rows
        for r in db["results"]:
            path = node.data_dir / r["path"]
            assert dcmread(path).SOPInstanceUID == r["sop_instance_uid"]
            assert _dciodvfy(path) == [], path

        # The SC as a viewer shows it: grey radiograph, coloured heat map, caption band.
        png = tmp_path / "sc.png"
        sc_file = tmp_path / "sc.dcm"
        scs[0].save_as(sc_file)
        # dcml2pnm: dcmtk's renderer with the JPEG-LS decoder (dcmj2pnm has only JPEG)
        subprocess.run([dcmtk("dcml2pnm"), "+on", str(sc_file), str(png)], check=True, capture_output=True)
        rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
        source = dcmread(originals[scs[0].SourceImageSequence[0].ReferencedSOPInstanceUID],
                         stop_before_pixels=True)
        h = round(source.Rows * min(1.0, 2048 / max(source.Rows, source.Columns)))
        image, band = rgb[:h], rgb[h:]
        assert band.shape[0] > 20 and (band.max(axis=2) < 40).mean() > 0.6  # a black band ...
        assert (band.min(axis=2) > 200).sum() > 200  # ... with white text
        coloured = (image.max(axis=2) - image.min(axis=2)) > 60
        assert 0.0005 < coloured.mean() < 0.9  # the finding outlined, not a grey image nor a flood
    finally:
        orthanc.stop()


def _db(node: Node) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{node.data_dir / 'audit.sqlite3'}?mode=ro", uri=True, timeout=30)


def _states(node: Node) -> dict[str, int]:
    with _db(node) as conn:
        return dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())


def test_orthanc_down_then_back(node_factory: type[Node], tmp_path: Path) -> None:
    """Results due while Orthanc is stopped wait in the outbox and arrive once when it is back."""
    orthanc = Orthanc(tmp_path / "orthanc", {})
    node = node_factory(data_dir=tmp_path / "data", config=_config(tmp_path / "n.toml", orthanc.dicom_port))
    node.start()
    study_uid, files = _two_views(tmp_path)
    assert storescu(node.port, files).returncode == 0
    pending = _wait(lambda: (lambda r: r if len(r) == 3 and all(x["attempts"] >= 2 for x in r) else None)(
        _outbox(node)), 60, "three results retried while Orthanc is down")
    assert all(r["state"] == "pending" and "cannot associate" in r["last_error"] for r in pending)
    orthanc.start()
    try:
        _wait(lambda: _states(node) == {"sent": 3}, 60, "delivery after Orthanc is back")
        series = orthanc.study_series(study_uid)
        uids = [dcmread(io.BytesIO(urllib.request.urlopen(orthanc.url(f"/instances/{i}/file")).read()),
                        stop_before_pixels=True).SOPInstanceUID for s in series for i in s["Instances"]]
        assert sorted(uids) == sorted(r["sop_instance_uid"] for r in pending)  # each once
        with _db(node) as conn:
            sent = conn.execute("SELECT count(*), count(DISTINCT sop_instance_uid) FROM events "
                                "WHERE event = 'outbox.sent'").fetchone()
            retries = conn.execute("SELECT count(*) FROM events WHERE event = 'outbox.retry'").fetchone()[0]
        assert sent == (3, 3) and retries >= 6
    finally:
        orthanc.stop()


def test_node_killed_while_sending(node_factory: type[Node], tmp_path: Path) -> None:
    """kill -9 between two deliveries; after restart everything arrives and nothing twice."""
    orthanc = Orthanc(tmp_path / "orthanc", {})
    cfg = _config(tmp_path / "n.toml", orthanc.dicom_port, extra="batch_size = 1")
    node = node_factory(data_dir=tmp_path / "data", config=cfg)
    orthanc.start()
    try:
        node.start()
        study_uid, files = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "study", copies=10,
                                      body_part=TIBIA)
        assert storescu(node.port, files).returncode == 0
        states = _wait(lambda: (lambda s: s if s.get("sent", 0) >= 1 and s.get("pending", 0) >= 2 else None)(
            _states(node)), 90, "delivery under way", interval=0.01)
        node.kill9()
        assert states.get("sent", 0) < 11
        node.start()
        _wait(lambda: _states(node) == {"sent": 11}, 90, "every result delivered after restart")
        series = orthanc.study_series(study_uid)
        in_orthanc = sorted(dcmread(io.BytesIO(urllib.request.urlopen(
            orthanc.url(f"/instances/{i}/file")).read()), stop_before_pixels=True).SOPInstanceUID
            for s in series for i in s["Instances"])
        with _db(node) as conn:
            made = sorted(r[0] for r in conn.execute("SELECT sop_instance_uid FROM results").fetchall())
            per_item = conn.execute("SELECT max(n) FROM (SELECT count(*) AS n FROM events "
                                    "WHERE event = 'outbox.sent' GROUP BY sop_instance_uid)").fetchone()[0]
        assert len(made) == 11 and in_orthanc == made
        assert per_item == 1
    finally:
        orthanc.stop()


def test_rejecting_destination_is_dead_after_one_attempt(node_factory: type[Node], tmp_path: Path) -> None:
    """Orthanc does not know the node's AE title: dead after one attempt, with the reason."""
    orthanc = Orthanc(tmp_path / "orthanc", {}, extra={"DicomAlwaysAllowStore": False,
                                                       "DicomAlwaysAllowEcho": False})
    node = node_factory(data_dir=tmp_path / "data",
                        config=_config(tmp_path / "n.toml", orthanc.dicom_port, outputs='["sr"]'))
    orthanc.start()
    try:
        node.start()
        _, files = _two_views(tmp_path)
        assert storescu(node.port, files).returncode == 0
        (row,) = _wait(lambda: [r for r in _outbox(node) if r["state"] == "dead"], 60, "a dead row")
        assert row["kind"] == "sr" and row["attempts"] == 1
        assert "rejected permanent" in row["last_error"].lower(), row
        assert "calling ae title not recognised" in row["last_error"].lower(), row
        assert node.cli("outbox", "retry", "--dead").returncode == 0
        assert _outbox(node)[0]["state"] in ("pending", "dead")
        (again,) = _wait(lambda: [r for r in _outbox(node, "--state", "dead") if r["attempts"] == 2],
                         30, "the retried row dead again")
        assert node.cli("outbox", "retry", "999999", check=False).returncode == 1
        with _db(node) as conn:
            events = [r[0] for r in conn.execute(
                "SELECT event FROM events WHERE stage IN ('outbox', 'admin') ORDER BY id").fetchall()]
        assert events == ["outbox.dead", "outbox.retry_requested", "outbox.dead"]
    finally:
        orthanc.stop()


def test_shadow_mode_and_reopened_study(node_factory: type[Node], tmp_path: Path) -> None:
    """Shadow mode: objects made, kept and audited, nothing queued. A late image re-opens the
    study: one new SC (same series), and a new SR over both images that supersedes the first."""
    cfg = _config(tmp_path / "n.toml", 9, results="shadow = true")
    node = node_factory(data_dir=tmp_path / "data", config=cfg).start()
    study_uid, files = _two_views(tmp_path)
    assert storescu(node.port, files[:1]).returncode == 0
    node.wait_state(study_uid, "processed")
    def sc_and_sr(study: dict[str, Any]) -> list[dict[str, Any]]:  # shadow mode also makes the GSPS
        return [r for r in study["results"] if r["kind"] in ("sc", "sr")]

    _wait(lambda: (lambda r: len(r) == 2 and all(x["path"] for x in r))(sc_and_sr(node.study(study_uid))),
          20, "first run's objects")
    assert storescu(node.port, files[1:]).returncode == 0
    study = _wait(lambda: (lambda s: s if s["state"] == "processed" and len(sc_and_sr(s)) == 4
                           and all(x["path"] for x in sc_and_sr(s)) else None)(node.study(study_uid)),
                  60, "second run's objects")
    results = sc_and_sr(study)
    assert [(r["kind"], r["run"]) for r in results] == [("sr", 0), ("sc", 0), ("sr", 1), ("sc", 1)]
    assert all(r["shadow"] and r["deliveries"] == [] for r in results)
    assert _outbox(node) == []
    first_sr, first_sc, second_sr, second_sc = (dcmread(node.data_dir / r["path"]) for r in results)
    # a series per laterality: the same series exactly when the two images have the same side
    same_side = first_sc.get("Laterality", "") == second_sc.get("Laterality", "")
    assert (first_sc.SeriesInstanceUID == second_sc.SeriesInstanceUID) == same_side
    assert (first_sc.InstanceNumber, second_sc.InstanceNumber) == (1, 2)
    assert [r["source_sop_instance_uid"] for r in (results[1], results[3])] == [
        dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
    assert second_sr.SeriesInstanceUID != first_sr.SeriesInstanceUID
    predecessor = second_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert results[2]["replaces"] == first_sr.SOPInstanceUID
    refs = {g["refs"][0] for g in _sr_groups(second_sr) if g["id"] != "study"}
    assert refs == {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    # The revision still says where the first run's finding is: the same region as before.
    regions = {g["refs"][0]: g["region"] for g in _sr_groups(second_sr)}
    (first,) = _sr_groups(first_sr)
    assert first["region"] and regions[first["refs"][0]] == first["region"]
    assert all(regions.values())
    assert len(_sr_groups(first_sr)) == 1  # one image; the study's result is at report level
    assert _study_result(first_sr)[0] in _GRADE_CODE.values()
    for r in results:
        assert _dciodvfy(node.data_dir / r["path"]) == []


@pytest.mark.parametrize(("accept_all", "syntax"), [(False, "1.2.840.10008.1.2.1"),
                                                    (True, "1.2.840.10008.1.2.4.80")])
def test_compressed_sc_is_sent_as_the_peer_accepts(tmp_path: Path, accept_all: bool, syntax: str) -> None:
    """A JPEG-LS SC goes to dcmtk's storescp as it is when the peer accepts JPEG-LS (``+xa``),
    decompressed when it accepts only uncompressed syntaxes (its default); the pixels arrive
    unchanged either way."""
    from dicomai.config import Destination, NodeConfig
    from dicomai.net.sender import Attempt, send_batch

    sc_path, _ = _make_sc(tmp_path)
    port = free_port()
    received = tmp_path / "received"
    received.mkdir()
    peer = subprocess.Popen([dcmtk("storescp"), *(["+xa"] if accept_all else []), "-aet", "PEER",
                             "-od", str(received), str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _listening(port), 10, "storescp listening")
        attempts: list[Attempt] = []
        dest = Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=port)
        batch = send_batch(NodeConfig(), dest, [(sc_path, str(dcmread(sc_path).SOPClassUID))],
                           lambda _n, a: attempts.append(a))
        assert batch.association_error is None and [a.status for a in attempts] == [0], attempts
    finally:
        peer.terminate()
        peer.wait(10)
    (got,) = received.iterdir()
    back = dcmread(got)
    assert back.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(back.pixel_array, dcmread(sc_path).pixel_array)


def _make_sc(tmp_path: Path) -> tuple[Path, Dataset]:
    from highdicom import UID

    from dicomai.imaging.pixels import to_display
    from dicomai.model.grading import Grade
    from dicomai.model.package import load_package
    from dicomai.results.sc import secondary_capture
    from tests.synthetic import hot_spot_model

    pkg = load_package(hot_spot_model(tmp_path / "m"))
    ds = dcmread(pydicom_data("RG3_UNCR.dcm"))
    shown = to_display(ds).image
    sc = secondary_capture(ds, shown, None, Grade.NEGATIVE, 0.1, pkg.manifest, UID(), max_side=512,
                           compress=True)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    return path, sc


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
