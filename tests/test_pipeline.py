"""Tests of the node's stage (analysis, then results): through the node, on bad inputs, after
interruptions and with lost spool files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomai.config import load_settings
from dicomai.model.classifier import Classifier
from dicomai.model.package import load_package
from dicomai.node import Triage
from dicomai.store import (
    Event,
    Instance,
    InstanceState,
    OutboxItem,
    Prediction,
    ResultObject,
    Series,
    Study,
    StudyState,
    make_sessionmaker,
    open_database,
)
from dicomai.store.models import utcnow
from dicomai.studies import StudyMonitor, StudyWork, WorkInstance, instance_arrived
from tests.helpers import Node, make_study, pydicom_data, shared_file, storescu
from tests.synthetic import hot_spot_model


def _bad_variants(tmp: Path) -> dict[str, Path]:
    """Three images the model cannot use: corrupt JPEG, unsupported syntax, zero size."""
    out = {}
    ds = dcmread(shared_file("RG2_JPLL.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(256)) * 4])
    out["corrupt"] = tmp / "corrupt.dcm"
    ds.save_as(out["corrupt"])
    ds = dcmread(pydicom_data("RG3_UNCR.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.2.1143.999"  # private, no decoder
    ds.PixelData = encapsulate([b"\x00" * 1024])
    out["unsupported"] = tmp / "unsupported.dcm"
    ds.save_as(out["unsupported"], enforce_file_format=True)
    ds = dcmread(pydicom_data("RG3_UNCR.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = 0
    ds.PixelData = b""
    out["zero"] = tmp / "zero.dcm"
    ds.save_as(out["zero"])
    return out


@dataclass(frozen=True)
class _Row(WorkInstance):
    study_id: int = 0


def _rows(sessions: sessionmaker[Session], study_uid: str, files: list[tuple[str, Path]],
          state: StudyState = StudyState.PROCESSING) -> list[_Row]:
    """A study (``processing`` unless said) with one stored instance per (SOP Instance UID, file)."""
    now = utcnow()
    with sessions.begin() as s:
        study = Study(study_instance_uid=study_uid, state=state, first_received_at=now,
                      last_received_at=now, state_changed_at=now, reopen_count=0)
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_instance_uid=generate_uid())
        s.add(series)
        s.flush()
        rows = []
        for uid, path in files:
            inst = Instance(study_id=study.id, series_id=series.id, sop_instance_uid=uid,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="x", version=1,
                            size_bytes=1, sha256="0" * 64, spool_path=str(path), state=InstanceState.STORED,
                            received_at=now)
            s.add(inst)
            s.flush()
            rows.append(_Row(inst.id, uid, inst.sop_class_uid, path, study.id))
    return rows


def run_stage(tmp_path: Path, study_uid: str, paths: list[Path], toml: str = "",
              body_parts: list[str] | None = None) -> sessionmaker[Session]:
    """The files as one received study (data in ``tmp_path / "data"``) through the node's stage
    once, with the test model (its manifest's ``body_parts`` when given) and the configuration
    ``toml``; returns the sessions of its audit database."""
    cfg = tmp_path / "stage.toml"
    cfg.write_text(toml)
    settings = load_settings(cfg, environ={"DICOMAI_NODE__DATA_DIR": str(tmp_path / "data")})
    sessions = make_sessionmaker(open_database(settings.database_url))
    model = hot_spot_model(tmp_path / "model")
    if body_parts is not None:
        manifest = json.loads((model / "model.json").read_text())
        manifest["body_parts"] = body_parts
        (model / "model.json").write_text(json.dumps(manifest))
    pkg = load_package(model)
    monitor = StudyMonitor(sessions, Path("/"), 0.0, Triage(settings, sessions, pkg, Classifier(pkg)))
    _rows(sessions, study_uid, [(dcmread(p, stop_before_pixels=True).SOPInstanceUID, p) for p in paths],
          state=StudyState.RECEIVING)
    assert monitor.poll() == 1
    return sessions


def test_bad_images_fail_alone(tmp_path: Path) -> None:
    """Corrupt, unsupported and zero-size images are failed with reasons; the rest is graded."""
    settings = load_settings(environ={"DICOMAI_NODE__DATA_DIR": str(tmp_path / "data"),
                                      "DICOMAI_SCOPE__MIN_SIZE_PX": "1"})
    sessions = make_sessionmaker(open_database(settings.database_url))
    pkg = load_package(hot_spot_model(tmp_path / "model"))
    stage = Triage(settings, sessions, pkg, Classifier(pkg))
    files = {**_bad_variants(tmp_path), "good": pydicom_data("RG3_UNCR.dcm")}
    uids = [(f"1.2.3.1.{n}", p) for n, p in enumerate(files.values())]
    work = list(zip(files, _rows(sessions, "1.2.3", uids), strict=True))
    study_id = work[0][1].study_id
    stage(StudyWork(study_id, "1.2.3", 0, tuple(w for _, w in work)))
    with sessions() as s:
        image_rows = s.scalars(select(Prediction).where(Prediction.level == "image"))
        preds = {p.sop_instance_uid: p for p in image_rows}
        by_name = {name: preds[w.sop_instance_uid] for name, w in work}
        study_pred = s.scalars(select(Prediction).where(Prediction.level == "study")).one()
        study_row = s.get_one(Study, study_id)
    for name in ("corrupt", "unsupported", "zero"):
        assert by_name[name].grade == "failed", name
        assert by_name[name].reason, name
    assert "empty image" in (by_name["zero"].reason or "")
    assert "cannot decode" in (by_name["corrupt"].reason or "")
    assert by_name["good"].grade in ("positive", "doubtful", "negative")
    assert by_name["good"].probability is not None and by_name["good"].gradcam_path
    assert (study_pred.grade, study_pred.probability) == (by_name["good"].grade, by_name["good"].probability)
    assert (study_row.grade, study_row.probability) == (study_pred.grade, study_pred.probability)


@pytest.mark.integration
def test_study_through_the_node_gets_predictions(node_factory: type[Node], tmp_path: Path) -> None:
    """A study sent with storescu ends with per-image and per-study predictions in the audit DB."""
    model = hot_spot_model(tmp_path / "model")
    node = node_factory(data_dir=tmp_path / "data",
                        env_extra={"DICOMAI_MODEL__PATH": str(model), "DICOMAI_MODEL__THREADS": "1"}).start()
    study_uid, files = make_study([pydicom_data("RG3_UNCR.dcm"), shared_file("RG2_JPLL.dcm"),
                                   shared_file("JPEGExtended_1s_1f_u_16_12.dcm")], tmp_path / "s")
    assert storescu(node.port, files).returncode == 0
    study = node.wait_state(study_uid, "processed")
    images = [p for p in study["predictions"] if p["level"] == "image"]
    assert len(images) == 3
    by_grade = sorted(p["grade"] for p in images)
    assert by_grade.count("not_analysed") == 1  # the NM secondary capture
    nm = next(p for p in images if p["grade"] == "not_analysed")
    assert "SOP class" in nm["reason"]
    graded = [p for p in images if p["grade"] in ("positive", "doubtful", "negative")]
    assert len(graded) == 2 and all(p["gradcam"] and p["infer_ms"] > 0 for p in graded)
    (summary,) = [p for p in study["predictions"] if p["level"] == "study"]
    assert summary["probability"] == max(p["probability"] for p in graded)
    assert study["grade"] == summary["grade"]
    rows = json.loads(node.cli("studies", "list", "--json", "--grade", summary["grade"]).stdout)
    assert [r["study_instance_uid"] for r in rows] == [study_uid]
    assert "study.classified" in node.log()


def test_node_refuses_a_bad_model(tmp_path: Path, node_factory: type[Node]) -> None:
    """A model whose hash does not match its manifest stops the node at start (exit 2)."""
    model = hot_spot_model(tmp_path / "model")
    with open(model / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    node = node_factory(data_dir=tmp_path / "data", env_extra={"DICOMAI_MODEL__PATH": str(model)})
    node.start(wait=False)
    assert node.proc is not None and node.proc.wait(timeout=60) == 2
    assert "does not match the manifest" in node.log()


_PACS = '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 9\n'


def _one_image_study(tmp_path: Path, shadow: bool = False, config: str = _PACS,
                     ) -> tuple[Triage, sessionmaker[Session], StudyMonitor, str, Path]:
    """A node's stage and monitor on SQLite, and one stored CR instance in a receiving study."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text('[results]\nshadow = true\n' if shadow else config)
    settings = load_settings(cfg, environ={"DICOMAI_NODE__DATA_DIR": str(tmp_path / "data")})
    sessions = make_sessionmaker(open_database(settings.database_url))
    pkg = load_package(hot_spot_model(tmp_path / "model"))
    stage = Triage(settings, sessions, pkg, Classifier(pkg))
    monitor = StudyMonitor(sessions, Path("/"), 0.0, stage)
    study_uid, (path,) = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "s")
    ds = dcmread(path, stop_before_pixels=True)
    _rows(sessions, study_uid, [(ds.SOPInstanceUID, path)], state=StudyState.RECEIVING)
    return stage, sessions, monitor, study_uid, path


def test_interrupted_run_makes_planned_captures_later(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A node killed between the two steps (SR recorded and queued, SCs not made yet): after
    the restart the monitor hands the study on again without its classified image, and the
    stage makes the SCs with the UIDs the SR already references; nothing is classified twice."""
    stage, sessions, monitor, study_uid, path = _one_image_study(tmp_path)
    ds = dcmread(path, stop_before_pixels=True)
    killed: list[StudyWork] = []

    def killed_after_step_one(work: StudyWork) -> None:
        monkeypatch.setattr(stage.publish, "_maps_and_captures", lambda *args: 0)
        stage(work)
        killed.append(work)
        raise KeyboardInterrupt  # not an Exception: the monitor records nothing, as after kill -9

    monitor.hook = killed_after_step_one
    with pytest.raises(KeyboardInterrupt):
        monitor.poll()
    with sessions() as s:
        rows = {r.kind: r for r in s.scalars(select(ResultObject))}
        assert set(rows) == {"sr", "sc", "gsps"} and rows["sc"].path is None
        assert s.scalar(select(Study.state)) == StudyState.PROCESSING
        planned_uid = rows["sc"].sop_instance_uid
    sr = dcmread(tmp_path / "data" / str(rows["sr"].path))
    assert planned_uid in str(sr)  # the SR references the SC before it exists
    monkeypatch.undo()
    handed: list[StudyWork] = []
    monitor.hook = lambda work: (handed.append(work), stage(work))[0]
    assert monitor.recover() == 1 and monitor.poll() == 1  # the restart
    assert handed[0].instances == ()  # the classified image is not handed out again
    with sessions() as s:
        sc = s.scalars(select(ResultObject).where(ResultObject.kind == "sc")).one()
        kinds = sorted(s.scalars(select(ResultObject.kind).join(
            OutboxItem, OutboxItem.result_id == ResultObject.id)))
        assert s.scalar(select(func.count()).select_from(Prediction)) == 2  # image + study, once
        assert s.scalar(select(Instance.state)) == InstanceState.PROCESSED
        assert s.scalar(select(Study.state)) == StudyState.PROCESSED
    assert sc.sop_instance_uid == planned_uid and sc.path
    made = dcmread(tmp_path / "data" / sc.path)
    assert made.SOPInstanceUID == planned_uid and made.SourceImageSequence[0].ReferencedSOPInstanceUID == (
        ds.SOPInstanceUID)
    assert kinds == ["sc", "sr"]


def _interrupt_after_step_one(stage: Triage, monitor: StudyMonitor, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the stage on the study up to its recorded SR, then "kill" the node and restart it."""
    real = stage.publish._maps_and_captures
    monkeypatch.setattr(stage.publish, "_maps_and_captures", lambda *args: 0)
    monitor.poll()
    monkeypatch.setattr(stage.publish, "_maps_and_captures", real)
    with monitor.sessions.begin() as s:  # as if killed before the monitor recorded completion
        s.execute(update(Study).values(state=StudyState.PROCESSING))
    monitor.recover()


def test_planned_capture_without_a_grade_is_not_made_negative(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A planned SC whose grade is missing is not made (never drawn as "negative"), and the
    failure is audited."""
    stage, sessions, monitor, study_uid, _ = _one_image_study(tmp_path)
    _interrupt_after_step_one(stage, monitor, monkeypatch)
    with sessions.begin() as s:
        s.execute(update(ResultObject).where(ResultObject.kind == "sc").values(grade=None))
    monitor.poll()
    with sessions() as s:
        sc = s.scalars(select(ResultObject).where(ResultObject.kind == "sc")).one()
        failed = s.scalars(select(Event).where(Event.event == "result.failed")).all()
    assert sc.path is None
    assert len(failed) == 1 and "no grade" in (failed[0].error or "")
    assert not list((tmp_path / "data" / "results" / study_uid).glob("*.sc.dcm"))


def test_capture_whose_source_is_gone_is_audited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A planned SC whose source file can no longer be read is audited as a failed result."""
    stage, sessions, monitor, _, path = _one_image_study(tmp_path)
    _interrupt_after_step_one(stage, monitor, monkeypatch)
    path.unlink()
    monitor.poll()
    with sessions() as s:
        failed = s.scalars(select(Event).where(Event.event == "result.failed")).all()
    assert len(failed) == 1 and "cannot read the source image" in (failed[0].error or "")
    assert failed[0].details == {"kind": "sc"}


def test_sr_keeps_an_image_whose_spool_file_is_gone(tmp_path: Path) -> None:
    """When a re-opened study's earlier image has lost its spool file, the new SR still reports
    that image's finding and references it: the evidence matches the study's grade."""
    stage, sessions, monitor, study_uid, first = _one_image_study(tmp_path, shadow=True)
    monitor.poll()
    first_uid = dcmread(first, stop_before_pixels=True).SOPInstanceUID
    first.unlink()
    _, (second,) = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "s2", study_uid=study_uid)
    second_uid = dcmread(second, stop_before_pixels=True).SOPInstanceUID
    with sessions.begin() as s:
        study = s.scalars(select(Study)).one()
        series = s.scalars(select(Series)).first()
        assert series is not None
        instance_arrived(s, study, utcnow(), None)
        s.add(Instance(study_id=study.id, series_id=series.id, sop_instance_uid=second_uid,
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.1", transfer_syntax_uid="x", version=1,
                       size_bytes=1, sha256="1" * 64, spool_path=str(second), state=InstanceState.STORED,
                       received_at=utcnow()))
    assert monitor.poll() == 1
    with sessions() as s:
        srs = s.scalars(select(ResultObject).where(ResultObject.kind == "sr").order_by(ResultObject.id)).all()
        grades = {p.sop_instance_uid: p.grade for p in s.scalars(select(Prediction).where(
            Prediction.level == "image"))}
    assert len(srs) == 2
    latest = dcmread(tmp_path / "data" / str(srs[1].path))
    referenced = {item.ReferencedSOPInstanceUID
                  for study in latest.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert {first_uid, second_uid} <= referenced
    assert str(latest).count("Fracture of bone") >= 3  # two images and the study
    assert grades[first_uid] in ("positive", "doubtful", "negative")


def test_default_configuration_keeps_results_without_a_destination(tmp_path: Path) -> None:
    """With no destination and shadow mode off, the SC, SR and GSPS are still made and kept in
    the data directory (nothing queued); ``results.keep = []`` makes none."""
    _, sessions, monitor, study_uid, _ = _one_image_study(tmp_path / "default", config="")
    monitor.poll()
    with sessions() as s:
        kinds = sorted(s.scalars(select(ResultObject.kind).where(ResultObject.path.is_not(None))))
        queued = s.scalar(select(func.count()).select_from(OutboxItem))
    assert kinds == ["gsps", "sc", "sr"] and queued == 0
    assert len(list((tmp_path / "default" / "data" / "results" / study_uid).glob("*.dcm"))) == 3
    _, sessions, monitor, _, _ = _one_image_study(tmp_path / "none", config="[results]\nkeep = []\n")
    monitor.poll()
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(ResultObject)) == 0
