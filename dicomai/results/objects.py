"""DICOM result objects for the PACS, built with highdicom's typed constructors.

:func:`secondary_capture`: per analysed image, an RGB Secondary Capture in the same study and
a new series: the radiograph as displayed, the Grad-CAM heat map blended on it and a caption
band saying what it is (grade, probability, model) and that it is an AI result to be
confirmed by a radiologist.

:func:`structured_report`: per study, a Comprehensive 3D SR following TID 1500 (as the IHE
AI Results profile asks): algorithm identification, one TID 1501 group per image (fracture
present / indeterminate / absent, the probability, references to the image and its SC),
not-analysed images with the reason, and the study-level result. UNVERIFIED.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom.sr as hsr
import numpy as np
from highdicom import UID
from highdicom.sc import SCImage
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomai import __version__
from dicomai.analysis.scope import OWN_MANUFACTURER
from dicomai.imaging.overlay import caption_band, overlay
from dicomai.imaging.pixels import resize
from dicomai.model.package import Manifest

__all__ = ["FRACTURE", "ImageFinding", "SC_SERIES_DESCRIPTION", "secondary_capture", "structured_report"]

#: SNOMED CT "Fracture of bone": the finding every group is about.
FRACTURE = hsr.CodedConcept("125605004", "SCT", "Fracture of bone")
_UNDETERMINED = hsr.CodedConcept("373068000", "SCT", "Undetermined")
_PROBABILITY = hsr.CodedConcept("122157", "DCM", "Probability")
_NO_UNITS = hsr.CodedConcept("1", "UCUM", "no units")
_COMMENT = hsr.CodedConcept("121106", "DCM", "Comment")
_GRADE_VALUE = {"positive": codes.SCT.Present, "doubtful": codes.SCT.Indeterminate,
                "negative": codes.SCT.Absent}
SR_SERIES_NUMBER = 9902

SC_SERIES_DESCRIPTION = "AI fracture map"
SC_SERIES_NUMBER = 9901


def secondary_capture(source: Dataset, display: NDArray[np.float32], cam: NDArray[np.float32] | None,
                      grade: str, probability: float, manifest: Manifest, series_uid: str,
                      instance_number: int = 1, max_side: int = 2048, opacity: float = 0.45,
                      floor: float = 0.25, sop_instance_uid: str | None = None) -> SCImage:
    """The Secondary Capture of one analysed radiograph.

    Parameters
    ----------
    source:
        The original image's data set (patient, study and references come from it).
    display, cam:
        The displayed radiograph and its Grad-CAM map (same geometry), both in [0, 1];
        ``cam`` may be ``None`` when the model has no map.
    series_uid:
        The result series (one per study, shared by its SC objects).
    sop_instance_uid:
        The SC's UID when it was assigned beforehand (an SR may reference it already).
    max_side:
        Larger images are downscaled so that their longer side is this many pixels.
    """
    h, w = display.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        display = resize(display, nh, nw)
        cam = resize(cam, nh, nw) if cam is not None else None
    rgb = overlay(display, cam, opacity=opacity, floor=floor)
    lines = [
        f"AI fracture: {grade.upper()}  p={probability:.2f}",
        f"{manifest.name} {manifest.version}" + ("" if cam is not None else "  (no heat map)"),
        "AI RESULT - NOT A DIAGNOSIS - TO BE CONFIRMED BY A RADIOLOGIST",
    ]
    pixels = np.ascontiguousarray(caption_band(rgb, lines))
    orientation = [str(v) for v in (source.get("PatientOrientation") or [])]
    known = len(orientation) == 2 and all(orientation)
    sc = SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or UID(), instance_number=instance_number,
        manufacturer=OWN_MANUFACTURER,
        patient_orientation=(orientation[0], orientation[1]) if known else ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    if not known:
        # The source does not say; Patient Orientation is Type 2C and stays empty rather
        # than carry the placeholder highdicom's constructor requires.
        sc.PatientOrientation = []
    # Type 2C for paired body parts (hand, hip, ...): the source's value, or empty when unknown.
    sc.Laterality = str(source.get("Laterality") or source.get("ImageLaterality") or "")
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName = "dicomai"
    sc.add_new(0x00181020, "LO", [f"dicomai {__version__}", f"{manifest.name} {manifest.version}"[:64]])
    sc.DerivationDescription = (
        f"Grad-CAM heat map of {manifest.name} {manifest.version} on the displayed radiograph; "
        f"AI result, to be confirmed by a radiologist")[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


@dataclass(frozen=True)
class ImageFinding:
    """One image's result as the SR reports it."""

    source: Dataset  # the original image (header is enough)
    grade: str  # positive, doubtful, negative, not_analysed or failed
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
    status = "not analysed" if finding.grade == "not_analysed" else "analysis failed"
    group[0].ContentSequence.append(hsr.TextContentItem(
        _COMMENT, f"{status}: {finding.reason or 'no reason recorded'}"[:1024],
        relationship_type=hsr.RelationshipTypeValues.CONTAINS))
    return group


def structured_report(findings: list[ImageFinding], study_grade: str, study_probability: float | None,
                      manifest: Manifest, thresholds: tuple[float, float], series_uid: str,
                      previous: Dataset | None = None) -> hsr.Comprehensive3DSR:
    """The study's SR (TID 1500); ``previous`` is the SR it supersedes, if any."""
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
    evidence = [f.source for f in findings] + [f.secondary_capture for f in findings
                                               if f.secondary_capture is not None]
    sr = hsr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=UID(), instance_number=1,
        manufacturer=OWN_MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        previous_versions=[previous] if previous is not None else None,
    )
    sr.SeriesDescription = f"AI fracture: {study_grade.upper().replace('_', ' ')}"[:64]
    sr.add_new(0x00181020, "LO", [f"dicomai {__version__}", f"{manifest.name} {manifest.version}"[:64]])
    return sr
