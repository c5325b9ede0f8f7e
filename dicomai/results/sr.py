"""The study's Structured Report: a Comprehensive 3D SR following TID 1500, built with highdicom.

As the IHE AI Results profile asks: algorithm identification, one TID 1501 group per image
(fracture present / indeterminate / absent, the probability, references to the image and its
SC), not-analysed and failed images with the reason, and the study-level result.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom.sr as hsr
from highdicom import UID
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomai import __version__
from dicomai.analysis.scope import OWN_MANUFACTURER
from dicomai.model.grading import Grade
from dicomai.model.package import Manifest
from dicomai.results.identity import apply_identity, identity_of

__all__ = ["FRACTURE", "ImageFinding", "SR_SERIES_NUMBER", "reference_header", "structured_report"]

#: SNOMED CT "Fracture of bone": the finding every group is about.
FRACTURE = hsr.CodedConcept("125605004", "SCT", "Fracture of bone")
_UNDETERMINED = hsr.CodedConcept("373068000", "SCT", "Undetermined")
_PROBABILITY = hsr.CodedConcept("122157", "DCM", "Probability")
_NO_UNITS = hsr.CodedConcept("1", "UCUM", "no units")
_COMMENT = hsr.CodedConcept("121106", "DCM", "Comment")
_GRADE_VALUE = {Grade.POSITIVE: codes.SCT.Present, Grade.DOUBTFUL: codes.SCT.Indeterminate,
                Grade.NEGATIVE: codes.SCT.Absent}
SR_SERIES_NUMBER = 9902


def reference_header(study_uid: str, series_uid: str, sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """The four UIDs an SR needs to reference an image, for images known only from the database
    (a result made in an earlier run, or a file that can no longer be read)."""
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, sop_instance_uid
    return ds


@dataclass(frozen=True)
class ImageFinding:
    """One image's result as the SR reports it."""

    source: Dataset  # the original image: its header, or a reference_header() from the database
    grade: Grade
    probability: float | None = None
    reason: str | None = None
    secondary_capture: Dataset | None = None  # its SC, when one was made


def _group(n: int, finding: ImageFinding, algorithm: hsr.AlgorithmIdentification,
           ) -> hsr.MeasurementsAndQualitativeEvaluations:
    refs = [hsr.SourceImageForMeasurementGroup(finding.source.SOPClassUID, finding.source.SOPInstanceUID)]
    if finding.secondary_capture is not None:
        sc = finding.secondary_capture
        refs.append(hsr.SourceImageForMeasurementGroup(sc.SOPClassUID, sc.SOPInstanceUID))
    tracking = hsr.TrackingIdentifier(uid=UID(), identifier=f"image {n}")
    if finding.grade in _GRADE_VALUE and finding.probability is not None:
        return hsr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking, finding_type=FRACTURE, algorithm_id=algorithm,
            source_images=refs,
            qualitative_evaluations=[hsr.QualitativeEvaluation(FRACTURE, _GRADE_VALUE[finding.grade])],
            measurements=[hsr.Measurement(_PROBABILITY, round(finding.probability, 4), _NO_UNITS,
                                          algorithm_id=algorithm)],
        )
    group = hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=FRACTURE, algorithm_id=algorithm,
        source_images=refs, qualitative_evaluations=[hsr.QualitativeEvaluation(FRACTURE, _UNDETERMINED)],
    )
    # TID 1501 is extensible: say why this image has no result.
    status = "not analysed" if finding.grade == Grade.NOT_ANALYSED else "analysis failed"
    group[0].ContentSequence.append(hsr.TextContentItem(
        _COMMENT, f"{status}: {finding.reason or 'no reason recorded'}"[:1024],
        relationship_type=hsr.RelationshipTypeValues.CONTAINS))
    return group


def structured_report(findings: list[ImageFinding], study_grade: Grade, study_probability: float | None,
                      manifest: Manifest, thresholds: tuple[float, float], series_uid: str,
                      identity: Dataset, previous: Dataset | None = None) -> hsr.Comprehensive3DSR:
    """The study's SR (TID 1500).

    ``identity`` is a received image of the study whose Patient and Study modules the SR
    copies (the findings' sources may be bare references); ``previous`` is the SR it
    supersedes, if any.
    """
    if not findings:
        raise ValueError("an SR needs at least one image")
    algorithm = hsr.AlgorithmIdentification(
        name=manifest.name, version=manifest.version, manufacturer=OWN_MANUFACTURER,
        parameters=[f"sha256={manifest.sha256}", f"high_sensitivity={thresholds[0]:.4f}",
                    f"high_specificity={thresholds[1]:.4f}"])
    groups = [_group(n, f, algorithm) for n, f in enumerate(findings, start=1)]
    study_tracking = hsr.TrackingIdentifier(uid=UID(), identifier="study")
    if study_grade in _GRADE_VALUE and study_probability is not None:
        groups.append(hsr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=study_tracking, finding_type=FRACTURE, algorithm_id=algorithm,
            qualitative_evaluations=[hsr.QualitativeEvaluation(FRACTURE, _GRADE_VALUE[study_grade])],
            measurements=[hsr.Measurement(_PROBABILITY, round(study_probability, 4), _NO_UNITS,
                                          algorithm_id=algorithm)]))
    observer = hsr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hsr.DeviceObserverIdentifyingAttributes(
            uid=UID(), name="dicomai", manufacturer_name=OWN_MANUFACTURER,
            model_name=f"{manifest.name} {manifest.version}"[:64]))
    report = hsr.MeasurementReport(
        observation_context=hsr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    # highdicom copies the patient and study from the first evidence item: a clean copy of
    # them, so that a source lacking or breaking a Type 2 attribute still gets its SR.
    patient = identity_of(identity)
    evidence = [patient] + [f.source for f in findings if f.source.SOPInstanceUID != patient.SOPInstanceUID]
    evidence += [f.secondary_capture for f in findings if f.secondary_capture is not None]
    sr = hsr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=UID(), instance_number=1,
        manufacturer=OWN_MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        previous_versions=[previous] if previous is not None else None,
    )
    apply_identity(patient, sr)
    sr.SeriesDescription = f"AI fracture: {study_grade.upper().replace('_', ' ')}"[:64]
    sr.add_new(0x00181020, "LO", [f"dicomai {__version__}", f"{manifest.name} {manifest.version}"[:64]])
    return sr
