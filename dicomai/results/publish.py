"""From a study's analysis to recorded results and queued DICOM objects.

For each run on a study, :class:`Publisher`

1. completes what an interrupted earlier run planned (SCs whose UIDs the last SR references);
2. grades the study over every image classified so far, this run's included;
3. makes the study's Structured Report, covering *every* image classified so far (when an
   earlier SR exists the new one names it in its Predecessor Documents Sequence), and
   records it in one transaction with the predictions, the study's grade, the planned SCs
   and a Grayscale Softcopy Presentation State per analysed image (the finding outlined on
   the original, no pixels: cheap enough to go with the flag), then wakes the sender: the
   triage flag reaches the PACS first; when this run found a positive image of a positive
   study, a Key Object Selection of the study's positive images goes with them;
4. draws the full-size Grad-CAM maps, keeps them (reduced), makes a Secondary Capture per
   image analysed in this run (a study's SCs share a series per laterality), records and
   queues them.

Objects are written under ``data_dir/results/<StudyInstanceUID>/`` (fsynced, then renamed).
A study with no image in scope gets an SR that says so (``results.not_analysed_sr``); a
re-opened study whose new images are all out of scope gets no new SR. An object that
cannot be made is audited as ``result.failed`` and never stops the predictions from being
recorded. A missing grade is never read as "no fracture": that SC is not made, and the
failure is audited.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog
from highdicom import UID
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicomai.analysis.scope import OWN_RESULT
from dicomai.analysis.study import AnalysedImage, StudyAnalysis
from dicomai.config import Output, Settings
from dicomai.imaging.pixels import FloatImage, decode, resize, to_display
from dicomai.model.grading import Grade, grade_study
from dicomai.model.package import Manifest, OperatingPoints
from dicomai.results.gsps import GSPS_SERIES_DESCRIPTION, presentation_state
from dicomai.results.identity import laterality_of
from dicomai.results.kos import KOS_DESCRIPTION, key_objects
from dicomai.results.region import hotspot_box
from dicomai.results.sc import SC_SERIES_DESCRIPTION, SC_SOP_CLASS, secondary_capture
from dicomai.results.sr import ImageFinding, reference_header, stable_uid, structured_report
from dicomai.store import results as store
from dicomai.store.events import record_event
from dicomai.store.models import utcnow
from dicomai.store.spool import Spool
from dicomai.studies import StudyWork

__all__ = ["Publisher"]

log = structlog.get_logger("dicomai.results")
_REPORTED = (Grade.POSITIVE, Grade.DOUBTFUL, Grade.NEGATIVE, Grade.FAILED)
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class _Plan:
    """The SCs this run will make: UIDs and instance numbers fixed before the SR is made."""

    # source instance id -> (SOP Instance UID, instance number, series: one per laterality)
    sc: dict[int, tuple[str, int, str]]


@dataclass
class _ScInput:
    instance_id: int
    source: Dataset
    grade: Grade
    probability: float
    display: FloatImage
    cam: FloatImage | None
    sop_instance_uid: str
    instance_number: int
    series_uid: str


class Publisher:
    """The results stage of the node: records a study's analysis and queues its objects."""

    #: Longer side of the Grad-CAM map kept on disk (the grid itself is in the database).
    MAP_SIDE = 512

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], manifest: Manifest,
                 points: OperatingPoints, on_queued: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        self.manifest = manifest
        self.points = points
        self.on_queued = on_queued
        self.data_dir = settings.data_dir
        self.results_dir = settings.data_dir / "results"
        self.spool = Spool(settings.data_dir, fsync=settings.storage.fsync)
        self.spool.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.stamp = store.ModelStamp(manifest.name, manifest.version, manifest.sha256,
                                      points.high_sensitivity, points.high_specificity)

    def wants(self, kind: Output) -> bool:
        """Whether objects of this kind are made at all: shadow mode, ``results.keep``, or a
        destination wants them."""
        r = self.settings.results
        return r.shadow or kind in r.keep or any(kind in d.outputs for d in self.settings.destinations)

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
            sc = secondary_capture(src, image, image, Grade.NEGATIVE, 0.0, self.manifest, UID(),
                                   compress=self.settings.results.sc_compress)
            structured_report([ImageFinding(src, Grade.NEGATIVE, 0.0, None, sc)], Grade.NEGATIVE, 0.0,
                              self.manifest, (self.points.high_sensitivity, self.points.high_specificity),
                              series_uid=UID(), identity=src)
        except Exception:  # noqa: BLE001 -- only a warm-up: the first study pays instead
            log.warning("results.warm_up_failed", exc_info=True)
        return time.perf_counter() - started

    def kick(self, queued: int) -> None:
        if queued and self.on_queued is not None:
            self.on_queued()

    # -- the stage -----------------------------------------------------------------------------

    def __call__(self, analysis: StudyAnalysis) -> None:
        started = time.perf_counter()
        work = analysis.work
        self._finish_planned(work)
        if not analysis.images:  # re-queued after a restart with nothing new: done
            return
        this_run = [i.instance.instance_id for i in analysis.images]
        with self.sessions() as s:  # short: on SQLite a transaction holds the write lock
            outputs = store.gather(s, work.study_id, this_run)
            s.rollback()
        items = [(e.grade, e.probability) for e in outputs.earlier]
        items += [(i.analysis.grade, i.analysis.probability) for i in analysis.images]
        grade, probability = grade_study(items)
        plan = self._plan(analysis, outputs)
        cams = self._maps(analysis)
        regions = {i.instance.instance_id: hotspot_box(cams[i.instance.instance_id][0])
                   for i in analysis.images if i.analysis.analysed and i.instance.instance_id in cams}
        report, failures = self._report(analysis, outputs, plan, grade, probability, regions)
        states, state_failures = self._presentations(analysis, outputs, regions)
        keys, key_failures = self._key_objects(analysis, outputs, grade)
        flag, flag_failures = report + states + keys, failures + state_failures + key_failures
        with self.sessions.begin() as s:
            ids = store.record_predictions(
                s, work.study_id, work.study_instance_uid, work.reopen_count, self.stamp,
                [self._prediction(i) for i in analysis.images], grade, probability, len(items), utcnow())
            queued = self._record(s, work, flag, flag_failures)
            grades = {i.instance.instance_id: i.analysis.grade for i in analysis.images}
            planned = {iid: (uid, series, grades[iid]) for iid, (uid, _, series) in plan.sc.items()}
            store.add_planned_scs(s, work.study_id, work.reopen_count, planned, self.settings.results.shadow,
                                  utcnow())
        self.kick(queued)
        flagged_s = time.perf_counter() - started
        made = self._maps_and_captures(analysis, plan, ids, cams)
        log.info("study.classified", study_uid=work.study_instance_uid, images=len(analysis.images),
                 positive=analysis.count(Grade.POSITIVE), doubtful=analysis.count(Grade.DOUBTFUL),
                 failed=analysis.count(Grade.FAILED), not_analysed=analysis.count(Grade.NOT_ANALYSED),
                 grade=grade, objects=len(flag) + made, flagged_s=round(flagged_s, 3),
                 seconds=round(time.perf_counter() - started + analysis.seconds, 3))

    @staticmethod
    def _prediction(image: AnalysedImage) -> store.PredictionRecord:
        a = image.analysis
        return store.PredictionRecord(
            instance_id=image.instance.instance_id, sop_instance_uid=image.instance.sop_instance_uid,
            grade=a.grade, probability=a.probability, reason=a.reason, window=a.window, gradcam=a.gradcam,
            points=a.points, stats=a.stats,
            decode_ms=a.timings.decode_ms, normalize_ms=a.timings.normalize_ms, infer_ms=a.timings.infer_ms)

    def _plan(self, analysis: StudyAnalysis, outputs: store.StudyOutputs) -> _Plan:
        """Assign the UIDs, instance numbers and series of this run's SCs (none when no SC is
        wanted). A study's SCs share a series per laterality (Laterality is a series
        attribute), its UID derived from the study's, so later runs add to the same series."""
        sc: dict[int, tuple[str, int, str]] = {}
        if self.wants(Output.SC):
            study_uid = analysis.work.study_instance_uid
            for image in analysis.images:
                source = image.analysis.source
                if image.analysis.analysed and source is not None:
                    series = stable_uid(study_uid, SC_SERIES_DESCRIPTION, laterality_of(source))
                    sc[image.instance.instance_id] = (UID(), outputs.sc_count + len(sc) + 1, series)
        return _Plan(sc)

    @staticmethod
    def _maps(analysis: StudyAnalysis) -> dict[int, tuple[FloatImage, float]]:
        """Each image's Grad-CAM map on its own geometry, drawn once for the region, the kept map
        and the SC, with the milliseconds it took."""
        maps: dict[int, tuple[FloatImage, float]] = {}
        for image in analysis.images:
            if image.analysis.gradcam is not None:
                t0 = time.perf_counter()
                cam = image.analysis.gradcam.on_image()
                maps[image.instance.instance_id] = (cam, (time.perf_counter() - t0) * 1e3)
        return maps

    # -- the SR --------------------------------------------------------------------------------

    def _report(self, analysis: StudyAnalysis, outputs: store.StudyOutputs, plan: _Plan, grade: Grade,
                probability: float | None, regions: dict[int, Box | None],
                ) -> tuple[list[store.NewObject], list[tuple[str, str | None, str]]]:
        """The study's SR, written; nothing when no SR is wanted or nothing new is in scope,
        except the first run on a study with nothing in scope: its SR says so
        (``results.not_analysed_sr``), so the PACS shows that the node saw the study."""
        if not self.wants(Output.SR) or not self._reportable(analysis, outputs):
            return [], []
        study_uid = analysis.work.study_instance_uid
        findings: list[ImageFinding] = []
        for e in outputs.earlier:
            ref = outputs.sc_of.get(e.ref.instance_id)
            sc = (reference_header(study_uid, ref.series_instance_uid, SC_SOP_CLASS, ref.sop_instance_uid)
                  if ref else None)
            findings.append(ImageFinding(self._header(study_uid, e.ref), e.grade, e.probability, e.reason,
                                         sc, self._earlier_region(e), e.thresholds))
        identity: Dataset | None = None
        for image in analysis.images:
            a, iid = image.analysis, image.instance.instance_id
            source = a.source if a.source is not None else self._header(study_uid, outputs.refs[iid])
            if a.source is not None and identity is None:
                identity = a.source
            planned = plan.sc.get(iid)
            sc = reference_header(study_uid, planned[2], SC_SOP_CLASS, planned[0]) if planned else None
            own = (a.points.high_sensitivity, a.points.high_specificity) if a.points is not None else None
            findings.append(ImageFinding(source, a.grade, a.probability, a.reason, sc, regions.get(iid), own))
        try:
            if identity is None:
                raise ValueError("no image of this run could be read for the patient's identity")
            previous = outputs.previous_sr
            prev_ds = dcmread(self.data_dir / previous[1]) if previous else None
            sr = structured_report(findings, grade, probability, self.manifest,
                                   (self.points.high_sensitivity, self.points.high_specificity),
                                   series_uid=UID(), identity=identity, previous=prev_ds)
            return [self._write(Output.SR, sr, study_uid, grade=grade,
                                replaces_id=previous[0] if previous else None)], []
        except Exception as exc:  # audited; the predictions are still recorded
            log.exception("result.sr_failed", study_uid=study_uid)
            return [], [("sr", None, repr(exc))]

    def _reportable(self, analysis: StudyAnalysis, outputs: store.StudyOutputs) -> bool:
        """Whether this run changes what the study's SR says: an image with a result, or a
        study seen for the first time with nothing in scope (not the node's own objects
        routed back: an SR about them would say nothing a radiologist needs)."""
        if any(i.analysis.grade in _REPORTED for i in analysis.images):
            return True
        return (self.settings.results.not_analysed_sr and outputs.previous_sr is None
                and any(i.analysis.grade == Grade.NOT_ANALYSED and i.analysis.reason != OWN_RESULT
                        for i in analysis.images))

    @staticmethod
    def _earlier_region(image: store.RecordedImage) -> Box | None:
        """An earlier run's image's region, drawn again from its kept grid, so that a revised SR
        still says where each finding is; ``None`` when it has none or it cannot be drawn."""
        if image.gradcam is None or image.grade not in (Grade.POSITIVE, Grade.DOUBTFUL, Grade.NEGATIVE):
            return None
        try:
            return hotspot_box(image.gradcam.on_image())
        except Exception:  # noqa: BLE001 -- the finding is still reported, without its region
            log.warning("result.region_failed", sop_uid=image.ref.sop_instance_uid, exc_info=True)
            return None

    # -- presentation states -------------------------------------------------------------------

    def _presentations(self, analysis: StudyAnalysis, outputs: store.StudyOutputs,
                       regions: dict[int, Box | None],
                       ) -> tuple[list[store.NewObject], list[tuple[str, str | None, str]]]:
        """A GSPS per analysed grayscale image of this run, written; none when none is wanted.

        A study's presentation states share a series per laterality (Laterality is a series
        attribute), its UID derived from the study's, so later runs add to the same series.
        Colour radiographs get none: a grayscale presentation state cannot reference them.
        """
        made: list[store.NewObject] = []
        failures: list[tuple[str, str | None, str]] = []
        if not self.wants(Output.GSPS):
            return made, failures
        study_uid = analysis.work.study_instance_uid
        for image in analysis.images:
            a, iid = image.analysis, image.instance.instance_id
            if (not a.analysed or a.source is None or a.probability is None
                    or int(a.source.get("SamplesPerPixel", 1)) != 1):
                continue
            try:
                series_uid = stable_uid(study_uid, GSPS_SERIES_DESCRIPTION, laterality_of(a.source))
                gsps = presentation_state(a.source, a.grade, a.probability, self.manifest, regions.get(iid),
                                          a.window, series_uid,
                                          instance_number=outputs.gsps_count + len(made) + 1)
                made.append(self._write(Output.GSPS, gsps, study_uid, grade=a.grade, source_instance_id=iid))
            except Exception as exc:  # one bad header must not cost the other images theirs
                log.exception("result.gsps_failed", study_uid=study_uid)
                failures.append(("gsps", image.instance.sop_instance_uid, repr(exc)))
        return made, failures

    def _key_objects(self, analysis: StudyAnalysis, outputs: store.StudyOutputs, grade: Grade,
                     ) -> tuple[list[store.NewObject], list[tuple[str, str | None, str]]]:
        """The KOS of the study's positive images, written, when the study is positive and this
        run found a positive image (else the last KOS still lists them all); none unless wanted."""
        new = [i.analysis.source for i in analysis.images
               if i.analysis.grade == Grade.POSITIVE and i.analysis.source is not None]
        if not self.wants(Output.KOS) or grade != Grade.POSITIVE or not new:
            return [], []
        study_uid = analysis.work.study_instance_uid
        earlier = [self._header(study_uid, e.ref) for e in outputs.earlier if e.grade == Grade.POSITIVE]
        try:
            kos = key_objects(earlier + new, self.manifest, stable_uid(study_uid, KOS_DESCRIPTION), new[0],
                              instance_number=outputs.kos_count + 1)
            return [self._write(Output.KOS, kos, study_uid, grade=grade)], []
        except Exception as exc:  # audited; the predictions and the other objects are still recorded
            log.exception("result.kos_failed", study_uid=study_uid)
            return [], [("kos", None, repr(exc))]

    @staticmethod
    def _header(study_uid: str, ref: store.ImageRef) -> Dataset:
        return reference_header(study_uid, ref.series_instance_uid, ref.sop_class_uid, ref.sop_instance_uid)

    # -- maps and SCs --------------------------------------------------------------------------

    def _maps_and_captures(self, analysis: StudyAnalysis, plan: _Plan, prediction_ids: dict[int, int],
                           cams: dict[int, tuple[FloatImage, float]]) -> int:
        """Full-size maps kept (reduced), SCs made and queued. Returns how many SCs."""
        work = analysis.work
        try:
            inputs: list[_ScInput] = []
            paths: dict[int, tuple[str, float]] = {}
            for image in analysis.images:
                a, iid = image.analysis, image.instance.instance_id
                cam = None
                if iid in cams:
                    cam, drawn_ms = cams[iid]
                    t0 = time.perf_counter()
                    path = self._save_map(work.study_instance_uid, image.instance.sop_instance_uid, cam)
                    paths[iid] = (path, drawn_ms + (time.perf_counter() - t0) * 1e3)
                planned = plan.sc.get(iid)
                if planned and a.source is not None and a.display is not None and a.probability is not None:
                    inputs.append(_ScInput(iid, a.source, a.grade, a.probability, a.display, cam, *planned))
            made, failures = self._captures(work.study_instance_uid, inputs)
            with self.sessions.begin() as s:
                for iid, (path, ms) in paths.items():
                    store.set_gradcam_path(s, prediction_ids[iid], path, ms)
                queued = self._record(s, work, made, failures)
            self.kick(queued)
            return len(made)
        except Exception as exc:  # the predictions and the SR are recorded already: report, go on
            log.exception("result.sc_failed", study_uid=work.study_instance_uid)
            with self.sessions.begin() as s:
                store.record_failure(s, work.study_instance_uid, "sc", None, repr(exc))
            return 0

    def _captures(self, study_uid: str, inputs: list[_ScInput],
                  ) -> tuple[list[store.NewObject], list[tuple[str, str | None, str]]]:
        made: list[store.NewObject] = []
        failures: list[tuple[str, str | None, str]] = []
        r = self.settings.results
        for i in inputs:
            try:
                # Kept JPEG-LS lossless (a quarter of the size); a destination that does not
                # accept it gets it decompressed by the sender.
                sc = secondary_capture(i.source, i.display, i.cam, i.grade, i.probability, self.manifest,
                                       i.series_uid, instance_number=i.instance_number, max_side=r.max_side,
                                       opacity=r.opacity, floor=r.floor, sop_instance_uid=i.sop_instance_uid,
                                       style=r.sc_style, compress=r.sc_compress)
                made.append(self._write(Output.SC, sc, study_uid, grade=i.grade,
                                        source_instance_id=i.instance_id))
            except Exception as exc:  # one bad header must not cost the other images their SC
                log.exception("result.sc_failed", study_uid=study_uid)
                failures.append(("sc", str(i.source.get("SOPInstanceUID", "")) or None, repr(exc)))
        return made, failures

    def _finish_planned(self, work: StudyWork) -> None:
        """Make the SCs an interrupted run planned (and its SR references) but did not make.

        The heat map is drawn again from the grid kept in the prediction row; the radiograph
        is read from the spool again. A planned SC without a recorded grade is not made.
        """
        with self.sessions() as s:
            planned = store.planned_scs(s, work.study_id)
            s.rollback()
        if not planned:
            return
        inputs: list[_ScInput] = []
        failures: list[tuple[str, str | None, str]] = []
        for p in planned:
            uid = p.source.sop_instance_uid
            if p.grade is None or p.probability is None:
                failures.append(("sc", uid, "no grade or probability recorded for the image: SC not made"))
                continue
            try:
                ds = dcmread(self.data_dir / p.source.spool_path)
                display = to_display(ds, decode(ds)).image
            except Exception as exc:  # noqa: BLE001 -- audited below as a failed SC
                failures.append(("sc", uid, f"cannot read the source image again: {exc!r}"))
                continue
            cam = p.gradcam.on_image() if p.gradcam is not None else None
            inputs.append(_ScInput(p.source.instance_id, ds, p.grade, p.probability, display, cam,
                                   p.sop_instance_uid, p.instance_number, p.series_instance_uid))
        made, sc_failures = self._captures(work.study_instance_uid, inputs)
        with self.sessions.begin() as s:
            queued = self._record(s, work, made, failures + sc_failures)
            record_event(s, "results", "result.resumed", study_instance_uid=work.study_instance_uid,
                         details={"planned": len(planned), "made": len(made)})
        log.info("results.resumed", study_uid=work.study_instance_uid, planned=len(planned), made=len(made))
        self.kick(queued)

    # -- files and rows ------------------------------------------------------------------------

    def _record(self, session: Session, work: StudyWork, made: list[store.NewObject],
                failures: list[tuple[str, str | None, str]]) -> int:
        for kind, sop_uid, error in failures:
            store.record_failure(session, work.study_instance_uid, kind, sop_uid, error)
        destinations = {str(kind): [d.name for d in self.settings.destinations if kind in d.outputs]
                        for kind in Output}
        return store.add_objects(session, work.study_id, work.study_instance_uid, work.reopen_count, made,
                                 destinations, self.settings.results.shadow,
                                 dt.timedelta(hours=self.settings.outbox.max_age_h), utcnow())

    def _write(self, kind: Output, ds: Dataset, study_uid: str, grade: Grade | None = None,
               source_instance_id: int | None = None, replaces_id: int | None = None) -> store.NewObject:
        buf = io.BytesIO()
        dcmwrite(buf, ds, enforce_file_format=True)
        data = buf.getvalue()
        path = self.results_dir / study_uid / f"{ds.SOPInstanceUID}.{kind}.dcm"
        self.spool.write_file(path, [data])
        return store.NewObject(
            kind=str(kind), sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
            series_instance_uid=str(ds.SeriesInstanceUID), path=str(path.relative_to(self.data_dir)),
            size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), grade=grade,
            source_instance_id=source_instance_id, replaces_id=replaces_id)

    def _save_map(self, study_uid: str, sop_uid: str, cam: FloatImage) -> str:
        h, w = cam.shape
        scale = min(1.0, self.MAP_SIDE / max(h, w))
        small = resize(cam, max(1, round(h * scale)), max(1, round(w * scale)))
        folder = self.results_dir / study_uid
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sop_uid}.gradcam.npz"
        np.savez(path, gradcam=small.astype(np.float16), image_shape=np.array([h, w]))
        return str(path.relative_to(self.data_dir))
