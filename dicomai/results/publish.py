"""Result objects of a classified study: made, kept durably, queued for every destination.

For each run of the classification stage on a study, :class:`Publisher` makes

* one Structured Report covering *every* image of the study classified so far (when an
  earlier SR exists the new one names it in its Predecessor Documents Sequence and gets its
  own series, whose description carries the grade, which may have changed);
* a Secondary Capture for each image analysed *in this run* (images classified in an earlier
  run already have theirs); all SCs of a study share one series.

The SR is the triage flag a radiologist's worklist shows, so it is made and queued first,
as soon as the probabilities are known; the SCs, which need the full-size heat maps
rendered, follow. Their UIDs are assigned beforehand (:meth:`Publisher.plan`) and recorded
with the SR (:meth:`Publisher.record_plan`), so that the SR can reference them and a
node stopped in between makes them after restart. Each object is written under
``data_dir/results/<StudyInstanceUID>/`` (fsynced, then renamed); :meth:`Publisher.record`
adds, in the caller's transaction, a ``results`` row per object (or completes the planned
one) and an ``outbox`` row per object and destination that wants that kind (none in shadow
mode).

A study with no image in scope gets no SR; a re-opened study whose new images are all out of
scope gets no new SR either (its findings did not change). An object that cannot be made is
reported as an event and never stops the classification results from being recorded.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import structlog
from highdicom import UID
from numpy.typing import NDArray
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicomai.config import Output, Settings
from dicomai.model.grading import Grade
from dicomai.model.package import Manifest, OperatingPoints
from dicomai.results.objects import ImageFinding, secondary_capture, structured_report
from dicomai.store import Instance, OutboxItem, OutboxState, Prediction, ResultObject, record_event
from dicomai.store.models import utcnow
from dicomai.store.spool import Spool

__all__ = ["Failure", "Made", "Plan", "Publisher", "RunImage", "StudyOutputs"]

log = structlog.get_logger("dicomai.results.publish")
_STAGE = "results"
_IN_SCOPE = (Grade.POSITIVE, Grade.DOUBTFUL, Grade.NEGATIVE, Grade.FAILED)
SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"

#: An object that could not be made: kind, SOP Instance UID (of the source, if any), error.
Failure = tuple[str, str | None, str]


@dataclass
class RunImage:
    """One image of this run as the publisher needs it."""

    instance_id: int
    source: Dataset  # the received data set (its header is what the objects copy)
    grade: Grade
    probability: float | None = None
    reason: str | None = None
    display: NDArray[np.float32] | None = None  # the displayed radiograph, analysed images only
    cam: NDArray[np.float32] | None = None  # Grad-CAM map on the same geometry, when the model has one


@dataclass(frozen=True)
class _Earlier:
    instance_id: int
    spool_path: str
    grade: str
    probability: float | None
    reason: str | None


@dataclass(frozen=True)
class _ScRef:
    """Enough of an SC for an SR to reference it (and list it as evidence)."""

    sop_instance_uid: str
    series_instance_uid: str

    def header(self, study_uid: str) -> Dataset:
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, self.series_instance_uid
        ds.SOPClassUID, ds.SOPInstanceUID = SC_SOP_CLASS, self.sop_instance_uid
        return ds


@dataclass
class StudyOutputs:
    """What earlier runs of a study left behind, read in one short transaction."""

    sc_series_uid: str | None = None
    sc_count: int = 0
    sc_of: dict[int, _ScRef] = field(default_factory=dict)  # by source instance id
    earlier: list[_Earlier] = field(default_factory=list)
    previous_sr: tuple[int, str] | None = None  # id and path of the SR to supersede


@dataclass(frozen=True)
class Plan:
    """The SCs this run will make: UIDs and instance numbers fixed before the SR is made."""

    series_uid: str
    sc: dict[int, tuple[str, int]]  # source instance id -> (SOP Instance UID, instance number)


@dataclass
class Made:
    """A result object written to disk, waiting for its rows."""

    kind: Output
    dataset: Dataset
    path: Path
    size_bytes: int
    sha256: str
    source_instance_id: int | None = None
    replaces_id: int | None = None
    grade: str | None = None


class Publisher:
    """Makes the result objects of one run and queues them for delivery."""

    def __init__(self, settings: Settings, manifest: Manifest, points: OperatingPoints) -> None:
        self.settings = settings
        self.manifest = manifest
        self.points = points
        self.spool = Spool(settings.data_dir, fsync=settings.storage.fsync)
        self.spool.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.results_dir = settings.data_dir / "results"

    def wants(self, kind: Output) -> bool:
        """Whether objects of this kind are made at all: shadow mode, or a destination wants them."""
        return self.settings.results.shadow or any(kind in d.outputs for d in self.settings.destinations)

    def warm_up(self) -> float:
        """Make one tiny SC and SR in memory, so that highdicom loads its standard tables
        (about 0.4 s) at start-up rather than on the first study. Returns the seconds spent."""
        started = time.perf_counter()
        src = Dataset()
        src.PatientName, src.PatientID, src.PatientBirthDate, src.PatientSex = "Warm^Up", "0", "", "O"
        src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID = UID(), UID(), UID()
        src.SOPClassUID, src.Modality = "1.2.840.10008.5.1.4.1.1.1", "CR"
        src.StudyID, src.StudyDate, src.StudyTime, src.AccessionNumber = "1", "20260101", "000000", ""
        src.ReferringPhysicianName = ""
        try:
            image = np.zeros((64, 64), dtype=np.float32)
            sc = secondary_capture(src, image, image, Grade.NEGATIVE, 0.0, self.manifest, UID())
            structured_report([ImageFinding(src, Grade.NEGATIVE, 0.0, None, sc)], Grade.NEGATIVE, 0.0,
                              self.manifest, (self.points.high_sensitivity, self.points.high_specificity),
                              series_uid=UID())
        except Exception:  # noqa: BLE001 -- only a warm-up: the first study pays instead
            log.warning("results.warm_up_failed", exc_info=True)
        return time.perf_counter() - started

    # -- reading what earlier runs left -------------------------------------------------------

    def gather(self, session: Session, study_id: int, exclude: set[int]) -> StudyOutputs:
        """Earlier images and their SCs, the SC series, the last SR; ``exclude``: this run's images.

        Only reads; keep the session short (on SQLite every transaction holds the write lock).
        """
        scs = session.execute(select(ResultObject.source_instance_id, ResultObject.sop_instance_uid,
                                     ResultObject.series_instance_uid).where(
            ResultObject.study_id == study_id, ResultObject.kind == Output.SC,
        ).order_by(ResultObject.id)).all()
        latest = select(func.max(Prediction.id)).where(
            Prediction.study_id == study_id, Prediction.level == "image",
            Prediction.instance_id.is_not(None),
        ).group_by(Prediction.instance_id)
        rows = session.execute(
            select(Instance.id, Instance.spool_path, Prediction.grade, Prediction.probability,
                   Prediction.reason)
            .join(Instance, Instance.id == Prediction.instance_id)
            .where(Prediction.id.in_(latest)).order_by(Instance.id)).all()
        previous = session.execute(select(ResultObject.id, ResultObject.path).where(
            ResultObject.study_id == study_id, ResultObject.kind == Output.SR,
            ResultObject.path.is_not(None),
        ).order_by(ResultObject.id.desc()).limit(1)).first()
        return StudyOutputs(
            sc_series_uid=scs[0][2] if scs else None, sc_count=len(scs),
            sc_of={src: _ScRef(uid, series) for src, uid, series in scs if src is not None},
            earlier=[_Earlier(i, path, g, p, r) for i, path, g, p, r in rows if i not in exclude],
            previous_sr=(previous[0], str(previous[1])) if previous else None)

    @staticmethod
    def planned(session: Session, study_id: int) -> tuple[Plan, dict[int, str | None]]:
        """SCs recorded as planned but not made yet (an interrupted run), with their grades."""
        rows = session.execute(select(ResultObject.sop_instance_uid, ResultObject.series_instance_uid,
                                      ResultObject.source_instance_id, ResultObject.path, ResultObject.grade)
                               .where(ResultObject.study_id == study_id, ResultObject.kind == Output.SC)
                               .order_by(ResultObject.id)).all()
        sc = {src: (uid, n) for n, (uid, _, src, path, _) in enumerate(rows, start=1)
              if path is None and src is not None}
        grades = {src: grade for _, _, src, path, grade in rows if path is None and src is not None}
        return Plan(rows[0][1] if rows else "", sc), grades

    def plan(self, images: list[RunImage], earlier: StudyOutputs) -> Plan:
        """Assign the UIDs and instance numbers of this run's SCs (none when no SC is wanted)."""
        series_uid = earlier.sc_series_uid or UID()
        sc: dict[int, tuple[str, int]] = {}
        if self.wants(Output.SC):
            for image in images:
                if image.grade in (Grade.POSITIVE, Grade.DOUBTFUL, Grade.NEGATIVE):
                    sc[image.instance_id] = (UID(), earlier.sc_count + len(sc) + 1)
        return Plan(series_uid, sc)

    # -- making ---------------------------------------------------------------------------------

    def make_report(self, study_uid: str, images: list[RunImage], plan: Plan, earlier: StudyOutputs,
                    grade: Grade, probability: float | None) -> tuple[list[Made], list[Failure]]:
        """The study's SR, written; nothing when no SR is wanted or nothing new is in scope."""
        if not self.wants(Output.SR) or not any(i.grade in _IN_SCOPE for i in images):
            return [], []
        findings: list[ImageFinding] = []
        for e in earlier.earlier:
            try:
                source = dcmread(self.settings.data_dir / e.spool_path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 -- a lost spool file: that image is left out of the SR
                log.warning("result.source_unreadable", study_uid=study_uid, instance_id=e.instance_id)
                continue
            ref = earlier.sc_of.get(e.instance_id)
            findings.append(ImageFinding(source, e.grade, e.probability, e.reason,
                                         ref.header(study_uid) if ref else None))
        for i in images:
            planned = plan.sc.get(i.instance_id)
            sc = _ScRef(planned[0], plan.series_uid).header(study_uid) if planned else None
            findings.append(ImageFinding(i.source, i.grade, i.probability, i.reason, sc))
        previous = earlier.previous_sr
        try:
            prev_ds = dcmread(self.settings.data_dir / previous[1]) if previous else None
            sr = structured_report(findings, grade, probability, self.manifest,
                                   (self.points.high_sensitivity, self.points.high_specificity),
                                   series_uid=UID(), previous=prev_ds)
            return [self._write(Output.SR, sr, study_uid, replaces_id=previous[0] if previous else None,
                                grade=grade)], []
        except Exception as exc:  # audited; the predictions are still recorded
            log.exception("result.sr_failed", study_uid=study_uid)
            return [], [("sr", None, repr(exc))]

    def make_secondary_captures(self, study_uid: str, images: list[RunImage], plan: Plan,
                                ) -> tuple[list[Made], list[Failure]]:
        """The planned SCs, written."""
        made: list[Made] = []
        failures: list[Failure] = []
        r = self.settings.results
        for image in images:
            planned = plan.sc.get(image.instance_id)
            if planned is None or image.display is None or image.probability is None:
                continue
            try:
                sc = secondary_capture(image.source, image.display, image.cam, image.grade,
                                       image.probability, self.manifest, plan.series_uid,
                                       instance_number=planned[1], max_side=r.max_side,
                                       opacity=r.opacity, floor=r.floor, sop_instance_uid=planned[0])
                made.append(self._write(Output.SC, sc, study_uid, source_instance_id=image.instance_id,
                                        grade=image.grade))
            except Exception as exc:  # one bad header must not cost the other images their SC
                log.exception("result.sc_failed", study_uid=study_uid)
                failures.append(("sc", str(image.source.get("SOPInstanceUID", "")) or None, repr(exc)))
        return made, failures

    def _write(self, kind: Output, ds: Dataset, study_uid: str, source_instance_id: int | None = None,
               replaces_id: int | None = None, grade: str | None = None) -> Made:
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        data = buf.getvalue()
        path = self.results_dir / study_uid / f"{ds.SOPInstanceUID}.{kind}.dcm"
        self.spool.write_file(path, [data])
        return Made(kind, ds, path, len(data), hashlib.sha256(data).hexdigest(),
                    source_instance_id=source_instance_id, replaces_id=replaces_id, grade=grade)

    # -- recording --------------------------------------------------------------------------

    def record_plan(self, session: Session, study_id: int, run: int, plan: Plan,
                    images: list[RunImage]) -> None:
        """Add a row per planned SC (no path yet), in the transaction that records the SR."""
        grades = {i.instance_id: i.grade for i in images}
        for source_id, (uid, _) in plan.sc.items():
            session.add(ResultObject(
                study_id=study_id, kind=Output.SC, run=run, sop_instance_uid=uid,
                sop_class_uid=SC_SOP_CLASS, series_instance_uid=plan.series_uid,
                source_instance_id=source_id, grade=grades.get(source_id),
                shadow=self.settings.results.shadow, created_at=utcnow()))

    def record(self, session: Session, study_id: int, study_uid: str, run: int, made: list[Made],
               failures: list[Failure]) -> int:
        """Add (or, for planned SCs, complete) the rows of the made objects and add their outbox
        items; returns how many items."""
        for kind, sop_uid, error in failures:
            record_event(session, _STAGE, "result.failed", level="error", study_instance_uid=study_uid,
                         sop_instance_uid=sop_uid, details={"kind": kind}, error=error)
        now = utcnow()
        shadow = self.settings.results.shadow
        expires = now + dt.timedelta(hours=self.settings.outbox.max_age_h)
        queued = 0
        for m in made:
            uid = str(m.dataset.SOPInstanceUID)
            row = session.scalar(select(ResultObject).where(ResultObject.sop_instance_uid == uid))
            if row is None:
                row = ResultObject(
                    study_id=study_id, kind=m.kind, run=run, sop_instance_uid=uid,
                    sop_class_uid=str(m.dataset.SOPClassUID),
                    series_instance_uid=str(m.dataset.SeriesInstanceUID),
                    source_instance_id=m.source_instance_id, replaces_id=m.replaces_id, grade=m.grade,
                    shadow=shadow, created_at=now)
                session.add(row)
            row.path = str(m.path.relative_to(self.settings.data_dir))
            row.size_bytes, row.sha256 = m.size_bytes, m.sha256
            session.flush()
            targets = [] if shadow else [d.name for d in self.settings.destinations if m.kind in d.outputs]
            for name in targets:
                session.add(OutboxItem(result_id=row.id, destination=name, state=OutboxState.PENDING,
                                       attempts=0, created_at=now, next_attempt_at=now, expires_at=expires))
            queued += len(targets)
            record_event(session, _STAGE, "result.created", study_instance_uid=study_uid,
                         sop_instance_uid=row.sop_instance_uid,
                         details={"kind": m.kind, "run": row.run, "grade": m.grade,
                                  "size_bytes": m.size_bytes,
                                  "replaces": m.replaces_id, "destinations": targets, "shadow": shadow})
        return queued
