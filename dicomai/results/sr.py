"""The study's Structured Report: a Comprehensive 3D SR following TID 1500, built with highdicom.

As the IHE AI Results profile asks: one group per image with its tracking identifier (the same
in every revision of the study's report), the algorithm once, where the image is (Finding Site
and laterality, from its header), the finding (fracture present / indeterminate / absent),
its probability and, where the model gave a map, its location (the map's hotspot as a region
on the source, TID 1501 row 10c; a TID 1410 group would read better in highdicom, but
validators then take the other groups for TID 1410 too), the SC as an illustration, not as
a source. Images not analysed or failed get a TID 1501 group saying "Analysis Performed:
Not performed" and a short reason. The study's result is the report-level qualitative
evaluation (TID 1500 row 12).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import highdicom.sr as hsr
from highdicom import UID
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomai import __version__
from dicomai.analysis.scope import OWN_MANUFACTURER, defined_term
from dicomai.model.grading import Grade, grade_label
from dicomai.model.package import Manifest
from dicomai.results.identity import apply_identity, identity_of, laterality_of
from dicomai.results.region import box_outline

__all__ = ["FRACTURE", "SR_REVISED", "SR_SERIES_NUMBER", "ImageFinding", "device_observer",
           "finding_site", "reference_header", "short_reason", "stable_uid", "structured_report"]

#: SNOMED CT "Fracture of bone": the finding every group is about.
FRACTURE = hsr.CodedConcept("125605004", "SCT", "Fracture of bone")
_PROBABILITY = hsr.CodedConcept("122157", "DCM", "Probability")
_NO_UNITS = hsr.CodedConcept("1", "UCUM", "no units")
_COMMENT = hsr.CodedConcept("121106", "DCM", "Comment")
_ANALYSIS_PERFORMED = hsr.CodedConcept("111004", "DCM", "Analysis Performed")
_NOT_PERFORMED = hsr.CodedConcept("262008008", "SCT", "Not performed")
#: The source image's concept name that highdicom before 0.26 looks for (0.26 and later read
#: DCM 121112 "Source of Measurement" as well; both are written).
_SOURCE = hsr.CodedConcept("260753009", "SCT", "Source")
_SOURCE_OF_MEASUREMENT = hsr.CodedConcept("121112", "DCM", "Source of Measurement")
_ILLUSTRATION = hsr.CodedConcept("121200", "DCM", "Illustration of ROI")
_QUALITATIVE_EVALUATIONS = hsr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_GRADE_VALUE = {Grade.POSITIVE: codes.SCT.Present, Grade.DOUBTFUL: codes.SCT.Indeterminate,
                Grade.NEGATIVE: codes.SCT.Absent}
#: Failure reasons as the analysis words them (before the exception), shown as they are.
_FAILURES = ("cannot read the DICOM file", "cannot decode the image", "cannot prepare the image",
             "inference failed")
#: Body Part Examined (the validated regions' terms) -> its SNOMED CT anatomic location, as
#: PS3.16 Annex L pairs them; the codes come from pydicom's dictionary of the standard.
_SITES = {"HAND": "Hand", "HANDS": "Hand", "FINGER": "Finger", "THUMB": "Thumb", "WRIST": "WristJoint",
          "LEG": "LowerLeg", "LOWERLEG": "LowerLeg", "TIBIA": "Tibia", "FIBULA": "Fibula", "KNEE": "Knee",
          "ANKLE": "AnkleJoint", "FOOT": "Foot", "FEET": "Foot", "TOE": "Toe", "HIP": "HipJoint",
          "PELVIS": "Pelvis", "SHOULDER": "Shoulder"}
_SIDES = {"R": "Right", "L": "Left", "B": "RightAndLeft"}
SR_SERIES_NUMBER = 9902
SR_REVISED = "(revised)"


def stable_uid(*parts: str) -> str:
    """A UID that is the same whenever it is made from the same parts (2.25 and a name-based
    UUID, PS3.5 B.2), so that tracking and observer UIDs survive a revision of the report."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join(('dicomai', *parts))).int}"


def short_reason(grade: Grade, reason: str | None) -> str:
    """Why an image has no result, in a few words a radiologist can read: the scope rule that
    left it out, or what failed, never the exception's text."""
    if grade == Grade.NOT_ANALYSED:
        return (reason or "not in scope").splitlines()[0][:160]
    head = (reason or "").split(":", 1)[0].strip()
    return head if head in _FAILURES else "analysis failed"


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
    region: tuple[int, int, int, int] | None = None  # the map's hotspot (col0, row0, col1, row1)
    # (high sensitivity, high specificity) it was graded by (a site profile may give its body
    # part its own); None: the report's pair
    thresholds: tuple[float, float] | None = None


def finding_site(source: Dataset) -> hsr.FindingSite | None:
    """Where the image is, coded (TID 1501 rows 6-7): its Body Part Examined as an anatomic
    location and its laterality; ``None`` when the body part is unknown or not mapped."""
    part = defined_term(source.get("BodyPartExamined"))
    if part not in _SITES:
        return None
    side = laterality_of(source).strip().upper()
    return hsr.FindingSite(anatomic_location=getattr(codes.SCT, _SITES[part]),
                           laterality=getattr(codes.SCT, _SIDES[side]) if side in _SIDES else None)


def _image(name: hsr.CodedConcept | Code, ref: Dataset) -> hsr.ImageContentItem:
    return hsr.ImageContentItem(name=name, referenced_sop_class_uid=ref.SOPClassUID,
                                referenced_sop_instance_uid=ref.SOPInstanceUID,
                                relationship_type=hsr.RelationshipTypeValues.CONTAINS)


def _group(n: int, study_uid: str, finding: ImageFinding, algorithm: hsr.AlgorithmIdentification,
           ) -> hsr.MeasurementsAndQualitativeEvaluations:
    src = finding.source
    tracking = hsr.TrackingIdentifier(uid=stable_uid(study_uid, str(src.SOPInstanceUID), "finding"),
                                      identifier=f"image {n}")
    analysed = finding.grade in _GRADE_VALUE and finding.probability is not None
    evaluations = measurements = None
    if analysed:
        evaluations = [hsr.QualitativeEvaluation(FRACTURE, _GRADE_VALUE[finding.grade])]
        measurements = [hsr.Measurement(_PROBABILITY, round(float(finding.probability or 0), 4), _NO_UNITS)]
    site = finding_site(src) if analysed else None
    group = hsr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=FRACTURE, algorithm_id=algorithm,
        finding_sites=[site] if site is not None else None,
        source_images=[hsr.SourceImageForMeasurementGroup(src.SOPClassUID, src.SOPInstanceUID)],
        measurements=measurements, qualitative_evaluations=evaluations)
    content = group[0].ContentSequence
    content.append(_image(_SOURCE, src))
    if analysed and finding.region is not None:  # TID 1501 row 10c: where the finding is
        region = hsr.ImageRegion(
            graphic_type=hsr.GraphicTypeValues.POLYLINE, graphic_data=box_outline(finding.region),
            source_image=hsr.SourceImageForRegion(src.SOPClassUID, src.SOPInstanceUID))
        # Named as the row's other sources: named "Image Region", validators take the group
        # for a TID 1410 planar ROI and the document's other groups with it.
        region.ConceptNameCodeSequence = [_SOURCE_OF_MEASUREMENT]
        content.append(region)
    if finding.secondary_capture is not None:
        content.append(_image(_ILLUSTRATION, finding.secondary_capture))
    if not analysed:
        content.append(hsr.CodeContentItem(_ANALYSIS_PERFORMED, _NOT_PERFORMED,
                                           relationship_type=hsr.RelationshipTypeValues.CONTAINS))
        content.append(hsr.TextContentItem(_COMMENT, short_reason(finding.grade, finding.reason),
                                           relationship_type=hsr.RelationshipTypeValues.CONTAINS))
    return group


def _study_result(grade: Grade, probability: float | None) -> hsr.ContainerContentItem | None:
    """TID 1500 rows 12-14: the study's result as the report-level qualitative evaluation."""
    if grade not in _GRADE_VALUE:
        return None
    container = hsr.ContainerContentItem(name=_QUALITATIVE_EVALUATIONS,
                                         relationship_type=hsr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hsr.ContentSequence([hsr.CodeContentItem(
        FRACTURE, _GRADE_VALUE[grade], relationship_type=hsr.RelationshipTypeValues.CONTAINS)])
    if probability is not None:
        container.ContentSequence.append(hsr.TextContentItem(
            _COMMENT, f"highest image probability {probability:.2f}",
            relationship_type=hsr.RelationshipTypeValues.CONTAINS))
    return container


def device_observer(manifest: Manifest) -> hsr.ObserverContext:
    """The node as the observer of its documents; its UID is the same for every document made
    with the same model."""
    return hsr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hsr.DeviceObserverIdentifyingAttributes(
            uid=stable_uid(OWN_MANUFACTURER, manifest.name, manifest.version), name="dicomai",
            manufacturer_name=OWN_MANUFACTURER,
            model_name=f"{manifest.name} {manifest.version}"[:64]))


def structured_report(findings: list[ImageFinding], study_grade: Grade, study_probability: float | None,
                      manifest: Manifest, thresholds: tuple[float, float], series_uid: str,
                      identity: Dataset, previous: Dataset | None = None) -> hsr.Comprehensive3DSR:
    """The study's SR (TID 1500).

    ``identity`` is a received image of the study whose Patient and Study modules the SR
    copies (the findings' sources may be bare references); ``previous`` is the SR it
    supersedes, if any: the new one gets the next instance number and "(revised)" in its
    description, and the same tracking and observer UIDs.
    """
    if not findings:
        raise ValueError("an SR needs at least one image")
    study_uid = str(identity.StudyInstanceUID)

    def algorithm(pair: tuple[float, float]) -> hsr.AlgorithmIdentification:
        # Each image group names the thresholds its grade was given by.
        return hsr.AlgorithmIdentification(
            name=manifest.name, version=manifest.version,
            parameters=[f"sha256={manifest.sha256}", f"high_sensitivity={pair[0]:.4f}",
                        f"high_specificity={pair[1]:.4f}"])

    groups = [_group(n, study_uid, f, algorithm(f.thresholds or thresholds))
              for n, f in enumerate(findings, start=1)]
    report = hsr.MeasurementReport(
        observation_context=hsr.ObservationContext(observer_device_context=device_observer(manifest)),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    study_result = _study_result(study_grade, study_probability)
    if study_result is not None:
        report[0].ContentSequence.append(study_result)
    revision = int(previous.get("InstanceNumber") or 0) + 1 if previous is not None else 1
    # highdicom copies the patient and study from the first evidence item: a clean copy of
    # them, so that a source lacking or breaking a Type 2 attribute still gets its SR.
    patient = identity_of(identity)
    evidence = [patient] + [f.source for f in findings if f.source.SOPInstanceUID != patient.SOPInstanceUID]
    evidence += [f.secondary_capture for f in findings if f.secondary_capture is not None]
    sr = hsr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=UID(), instance_number=revision,
        manufacturer=OWN_MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        previous_versions=[previous] if previous is not None else None,
    )
    apply_identity(patient, sr)
    marker = f" {SR_REVISED}" if previous is not None else ""
    sr.SeriesDescription = f"AI fracture: {grade_label(study_grade)}{marker}"[:64]
    sr.add_new(0x00181020, "LO", [f"dicomai {__version__}", f"{manifest.name} {manifest.version}"[:64]])
    return sr
