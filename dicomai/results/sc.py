"""The Secondary Capture of one analysed radiograph, built with highdicom's typed constructor.

An RGB image in the same study and a result series: the radiograph as displayed, the Grad-CAM
heat map blended on it and a caption band saying what it is (grade, probability, model) and
that it is an AI result to be confirmed by a radiologist.
"""

from __future__ import annotations

import numpy as np
from highdicom import UID, ContributingEquipment
from highdicom.sc import SCImage
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from dicomai import __version__
from dicomai.analysis.scope import OWN_MANUFACTURER
from dicomai.imaging.overlay import caption_band, overlay
from dicomai.imaging.pixels import resize
from dicomai.model.grading import Grade
from dicomai.model.package import Manifest
from dicomai.results.identity import apply_identity, identity_of, values_of

__all__ = ["SC_SERIES_DESCRIPTION", "SC_SERIES_NUMBER", "SC_SOP_CLASS", "secondary_capture"]

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SC_SERIES_DESCRIPTION = "AI fracture map"
SC_SERIES_NUMBER = 9901


def secondary_capture(source: Dataset, display: NDArray[np.float32], cam: NDArray[np.float32] | None,
                      grade: Grade, probability: float, manifest: Manifest, series_uid: str,
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
    orientation = values_of(source, "PatientOrientation")
    known = len(orientation) == 2 and all(orientation)
    identity = identity_of(source)
    sc = SCImage.from_ref_dataset(
        ref_dataset=identity, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=series_uid, series_number=SC_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or UID(), instance_number=instance_number,
        manufacturer=OWN_MANUFACTURER,
        patient_orientation=(orientation[0], orientation[1]) if known else ("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1", contributing_equipment=_acquisition(source),
    )
    apply_identity(identity, sc)
    if not known:
        # The source does not say; Patient Orientation is Type 2C and stays empty rather
        # than carry the placeholder highdicom's constructor requires.
        sc.PatientOrientation = []
    # Type 2C for paired body parts (hand, hip, ...): the source's value, or empty when unknown.
    sc.Laterality = (values_of(source, "Laterality") or values_of(source, "ImageLaterality") or [""])[0]
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
    ref.ReferencedSOPClassUID = identity.SOPClassUID
    ref.ReferencedSOPInstanceUID = identity.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def _acquisition(source: Dataset) -> list[ContributingEquipment] | None:
    """The source's acquisition equipment, when its General Equipment module can be read."""
    try:
        return [ContributingEquipment.for_image_acquisition(source)]
    except Exception:  # noqa: BLE001 -- optional: a source without a usable manufacturer
        return None
