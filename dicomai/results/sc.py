"""The Secondary Capture of one analysed radiograph, built with highdicom's typed constructor.

An RGB image in the same study and a result series: the radiograph as displayed, the finding
drawn on it and a caption band under the image (viewers print their own text in the corners)
saying what it is (grade, probability, model) and that it is an AI result to be confirmed by
a radiologist. The finding is drawn as a radiologist reads best (``outline``, the default):
the hotspot box and thin contours of the Grad-CAM map, the bone under them left visible; or
as the map blended over the image (``heatmap``). JPEG-LS lossless when asked: an RGB
radiograph compresses to a fraction of its size.
"""

from __future__ import annotations

import numpy as np
from highdicom import UID, ContributingEquipment
from highdicom.sc import SCImage
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless

from dicomai import __version__
from dicomai.analysis.scope import OWN_MANUFACTURER
from dicomai.config import ScStyle
from dicomai.imaging.overlay import caption_band, colormap, overlay
from dicomai.imaging.pixels import resize
from dicomai.model.grading import Grade, grade_label
from dicomai.model.package import Manifest
from dicomai.results.identity import (
    apply_identity,
    apply_series_context,
    identity_of,
    laterality_of,
    values_of,
)
from dicomai.results.region import hotspot_box

__all__ = ["BOX_COLOUR", "CONTOUR_LEVELS", "SC_SERIES_DESCRIPTION", "SC_SERIES_NUMBER", "SC_SOP_CLASS",
           "outlined", "secondary_capture"]

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SC_SERIES_DESCRIPTION = "AI fracture map"
SC_SERIES_NUMBER = 9901
BOX_COLOUR = (255, 220, 0)  # yellow: seen on white bone and on dark soft tissue alike
#: Map levels (fractions of its maximum) drawn as contours in the outline style.
CONTOUR_LEVELS = (0.5, 0.75)


def _edge(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def outlined(image: NDArray[np.floating], cam: NDArray[np.floating] | None) -> NDArray[np.uint8]:
    """The grey image with the map's hotspot boxed (a frame just outside the box, so the box's
    own pixels stay grey) and 1-pixel contours of the map at :data:`CONTOUR_LEVELS`.

    Parameters
    ----------
    image, cam:
        Display image and map in [0, 1], same H x W; ``cam`` may be ``None`` (grey only).
    """
    rgb = overlay(image, None)
    if cam is None:
        return rgb
    if cam.shape != image.shape:
        raise ValueError(f"map shape {cam.shape} differs from image shape {image.shape}")
    box = hotspot_box(cam)
    if box is None:
        return rgb
    for level in CONTOUR_LEVELS:
        edge = _edge(cam >= level * float(cam.max()))
        rgb[edge] = np.round(colormap(np.array([level], dtype=np.float32))[0] * 255).astype(np.uint8)
    h, w = image.shape
    t = max(2, round(max(h, w) / 500))
    c0, r0, c1, r1 = box
    frame = np.zeros((h, w), dtype=bool)
    frame[max(0, r0 - t):min(h, r1 + t + 1), max(0, c0 - t):min(w, c1 + t + 1)] = True
    frame[r0:r1 + 1, c0:c1 + 1] = False
    rgb[frame] = BOX_COLOUR
    return rgb


def secondary_capture(source: Dataset, display: NDArray[np.float32], cam: NDArray[np.float32] | None,
                      grade: Grade, probability: float, manifest: Manifest, series_uid: str,
                      instance_number: int = 1, max_side: int = 2048, opacity: float = 0.45,
                      floor: float = 0.25, sop_instance_uid: str | None = None,
                      style: ScStyle = ScStyle.OUTLINE, compress: bool = False) -> SCImage:
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
    style:
        ``outline`` (box and contours, see :func:`outlined`) or ``heatmap`` (``opacity`` and
        ``floor`` apply).
    compress:
        Store the pixels JPEG-LS lossless.
    """
    h, w = display.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        display = resize(display, nh, nw)
        cam = resize(cam, nh, nw) if cam is not None else None
    rgb = outlined(display, cam) if ScStyle(style) == ScStyle.OUTLINE else overlay(
        display, cam, opacity=opacity, floor=floor)
    lines = [
        f"AI fracture: {grade_label(grade)}  p={probability:.2f}",
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
        transfer_syntax_uid=JPEGLSLossless if compress else ExplicitVRLittleEndian,
        contributing_equipment=_acquisition(source),
    )
    apply_identity(identity, sc)
    if not known:
        # The source does not say; Patient Orientation is Type 2C and stays empty rather
        # than carry the placeholder highdicom's constructor requires.
        sc.PatientOrientation = []
    # Type 2C for paired body parts (hand, hip, ...): the source's value, or empty when unknown.
    sc.Laterality = laterality_of(source)
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    apply_series_context(source, sc)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.ManufacturerModelName = "dicomai"
    sc.add_new(0x00181020, "LO", [f"dicomai {__version__}", f"{manifest.name} {manifest.version}"[:64]])
    sc.DerivationDescription = (
        f"Grad-CAM map of {manifest.name} {manifest.version} on the displayed radiograph "
        f"({'hotspot box and contours' if ScStyle(style) == ScStyle.OUTLINE else 'heat map'}); "
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
