"""Tests of the Key Object Selection of a positive study: validity, content, when it is made."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from highdicom import UID
from highdicom.ko import KeyObjectSelectionDocument
from pydicom import dcmread
from sqlalchemy import select

from dicomai.config import load_settings
from dicomai.model.classifier import Classifier
from dicomai.model.package import load_package
from dicomai.node import Triage
from dicomai.results.kos import KOS_DESCRIPTION, key_objects
from dicomai.results.sr import reference_header
from dicomai.store import OutboxItem, ResultObject, StudyState, make_sessionmaker, open_database
from dicomai.studies import StudyMonitor
from tests.helpers import dcmtk, make_study, pydicom_data, shared_file
from tests.synthetic import hot_spot_model
from tests.test_pipeline import _rows
from tests.test_results_gsps import _all_messages


def test_kos_is_valid_and_lists_the_key_images(tmp_path: Path) -> None:
    """dciodvfy reports no error or warning; highdicom reads back an "Of Interest" document of
    the study's patient that lists every key image, one known only from the database included,
    and says it is an AI selection."""
    pkg = load_package(hot_spot_model(tmp_path / "m"))
    a = dcmread(pydicom_data("RG3_UNCR.dcm"), stop_before_pixels=True)
    b = dcmread(shared_file("RG2_JPLL.dcm"), stop_before_pixels=True)
    b.StudyInstanceUID = a.StudyInstanceUID
    earlier = reference_header(a.StudyInstanceUID, UID(), "1.2.840.10008.5.1.4.1.1.1", UID())
    path = tmp_path / "ko.dcm"
    key_objects([earlier, a, b], pkg.manifest, UID(), a).save_as(path)
    assert _all_messages(path) == []
    back = KeyObjectSelectionDocument.from_dataset(dcmread(path))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59" and back.Modality == "KO"
    assert (back.PatientID, back.StudyInstanceUID, back.SeriesDescription) == (
        a.PatientID, a.StudyInstanceUID, KOS_DESCRIPTION)
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")  # Of Interest
    for ds in (earlier, a, b):
        assert back.resolve_reference(ds.SOPInstanceUID)[2] == ds.SOPInstanceUID
    dump = subprocess.run([dcmtk("dsrdump"), "+Pl", str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and "to be confirmed" in dump.stdout
    assert dump.stdout.count('(,,"Source")') == 3


def test_kos_refuses_nothing_or_another_study(tmp_path: Path) -> None:
    """No image, or an image of another study, raises ValueError."""
    pkg = load_package(hot_spot_model(tmp_path / "m"))
    a = dcmread(pydicom_data("RG3_UNCR.dcm"), stop_before_pixels=True)
    with pytest.raises(ValueError, match="at least one"):
        key_objects([], pkg.manifest, UID(), a)
    other = reference_header(UID(), UID(), "1.2.840.10008.5.1.4.1.1.1", UID())
    with pytest.raises(ValueError, match="study"):
        key_objects([other], pkg.manifest, UID(), a)


def _run(tmp_path: Path, outputs: str, thresholds: tuple[float, float] = (0.3, 0.7),
         ) -> tuple[list[ResultObject], list[tuple[str, str]], list[str]]:
    """One two-image study through the node's stage, a destination with these outputs; the
    KOS rows, the outbox (destination, kind) and the study's images' UIDs."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 9\n'
                   f'outputs = {outputs}\n')
    settings = load_settings(cfg, environ={"DICOMAI_NODE__DATA_DIR": str(tmp_path / "data")})
    sessions = make_sessionmaker(open_database(settings.database_url))
    pkg = load_package(hot_spot_model(tmp_path / "model", thresholds=thresholds))
    monitor = StudyMonitor(sessions, Path("/"), 0.0, Triage(settings, sessions, pkg, Classifier(pkg)))
    study_uid, paths = make_study([pydicom_data("RG3_UNCR.dcm"), shared_file("RG2_JPLL.dcm")], tmp_path / "s")
    uids = [(dcmread(p, stop_before_pixels=True).SOPInstanceUID, p) for p in paths]
    _rows(sessions, study_uid, uids, state=StudyState.RECEIVING)
    assert monitor.poll() == 1
    with sessions() as s:
        rows = list(s.scalars(select(ResultObject).where(ResultObject.kind == "kos")))
        sent = sorted((o.destination, k) for o, k in s.execute(
            select(OutboxItem, ResultObject.kind).join(ResultObject,
                                                       ResultObject.id == OutboxItem.result_id)))
    return rows, sent, [u for u, _ in uids]


def test_positive_study_gets_a_kos_where_a_destination_asks(tmp_path: Path) -> None:
    """A positive study gets one KOS, listing its positive images, queued to the destination
    whose outputs include "kos"."""
    rows, sent, uids = _run(tmp_path, '["sr", "kos"]')
    assert len(rows) == 1 and rows[0].path and rows[0].grade == "positive"
    assert sent == [("pacs", "kos"), ("pacs", "sr")]
    kos = dcmread(tmp_path / "data" / str(rows[0].path))
    listed = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
              for i in kos.ContentSequence if i.ValueType == "IMAGE"}
    assert listed and listed <= set(uids)


def test_no_kos_unless_wanted_and_positive(tmp_path: Path) -> None:
    """No destination asks for a KOS: none is made; a negative study gets none either."""
    rows, sent, _ = _run(tmp_path / "unwanted", '["sc", "sr"]')
    assert rows == [] and ("pacs", "kos") not in sent
    rows, _, _ = _run(tmp_path / "negative", '["kos"]', thresholds=(0.9999, 0.99999))
    assert rows == []
