"""The Grayscale Softcopy Presentation State of one analysed radiograph, built with highdicom.

It shows the *source* image as the modality meant it (its Modality LUT and window, or the
window the analysis computed when the file has none) with the finding on a graphic layer of
its own: the hotspot box of the Grad-CAM map outlined (the same polygon as the SR's image
region) and a short caption beside it. A viewer can switch the layer off and window the
radiograph freely; nothing is burned into pixels.
"""

from __future__ import annotations

from highdicom import UID, PresentationLUTShapeValues, PresentationLUTTransformation
from highdicom.color import CIELabColor
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextJustificationValues,
    TextObject,
)
from pydicom.dataset import Dataset

from dicomai import __version__
from dicomai.analysis.scope import OWN_MANUFACTURER
from dicomai.imaging.pixels import Window, WindowSource
from dicomai.model.grading import Grade, grade_label
from dicomai.model.package import Manifest
from dicomai.results.identity import (
    apply_identity,
    apply_series_context,
    identity_of,
    laterality_of,
)
from dicomai.results.region import box_outline

__all__ = ["GSPS_LAYER", "GSPS_SERIES_DESCRIPTION", "GSPS_SERIES_NUMBER", "OUTLINED", "caption",
           "presentation_state"]

GSPS_SERIES_DESCRIPTION = "AI fracture outline"
GSPS_SERIES_NUMBER = 9903
GSPS_LAYER = "AI_FINDING"
#: Grades whose hotspot is outlined: on a negative image a box would point at a fracture the
#: model says is not there, so it gets the caption only.
OUTLINED = (Grade.POSITIVE, Grade.DOUBTFUL)
_YELLOW = CIELabColor(97.1, -21.6, 94.5)
#: A bright grey for viewers that draw graphics in grey (dcmtk's renderer among them).
_GREY_VALUE = 0xFFFF


def caption(grade: Grade, probability: float) -> str:
    """The short text shown with the finding. ASCII only: the GSPS keeps the source's
    character set, which may be the default repertoire."""
    return f"AI: fracture {grade_label(grade)} p={probability:.2f} - to be confirmed"


def presentation_state(source: Dataset, grade: Grade, probability: float, manifest: Manifest,
                       region: tuple[int, int, int, int] | None, window: Window | None, series_uid: str,
                       sop_instance_uid: str | None = None,
                       instance_number: int = 1) -> GrayscaleSoftcopyPresentationState:
    """The GSPS of one analysed grayscale radiograph.

    Parameters
    ----------
    source:
        The original image's data set (single-frame, one sample per pixel).
    region:
        The map's hotspot ``(col0, row0, col1, row1)`` in source pixels; outlined for the
        grades in :data:`OUTLINED`.
    window:
        The window the analysis displayed the image with; written only when the file has no
        window of its own (``percentile``), else the file's windows and VOI LUTs are kept.

    Raises
    ------
    ValueError
        For a colour image (a grayscale presentation state cannot reference it) or a region
        outside the image.
    """
    if int(source.get("SamplesPerPixel", 1)) != 1:
        raise ValueError("a grayscale presentation state needs a single-sample image")
    rows, columns = int(source.Rows), int(source.Columns)
    reference = _reference(source)
    layer = GraphicLayer(GSPS_LAYER, order=1, description="AI fracture finding, to be confirmed",
                         display_color=_YELLOW)
    layer.GraphicLayerRecommendedDisplayGrayscaleValue = _GREY_VALUE
    graphics: list[GraphicObject] = []
    text: TextObject
    if region is not None and grade in OUTLINED:
        c0, r0, c1, r1 = region
        if not (0 <= c0 <= c1 < columns and 0 <= r0 <= r1 < rows):
            raise ValueError(f"region {region} outside the {columns}x{rows} image")
        graphics.append(GraphicObject(GraphicTypeValues.POLYLINE, box_outline(region),
                                      AnnotationUnitsValues.PIXEL))
        text = TextObject(caption(grade, probability), AnnotationUnitsValues.PIXEL,
                          bounding_box=_beside(region, rows, columns),
                          text_justification=TextJustificationValues.LEFT)
    else:  # bottom left: the top corners are where viewers print their own text
        text = TextObject(caption(grade, probability), AnnotationUnitsValues.DISPLAY,
                          bounding_box=(0.02, 0.93, 0.7, 0.98),
                          text_justification=TextJustificationValues.LEFT)
    annotation = GraphicAnnotation([reference], layer, graphic_objects=graphics or None,
                                   text_objects=[text])
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[reference], series_instance_uid=series_uid, series_number=GSPS_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid or UID(), instance_number=instance_number,
        manufacturer=OWN_MANUFACTURER, manufacturer_model_name="dicomai",
        software_versions=f"dicomai {__version__}", device_serial_number="",
        content_label="AI_FRACTURE", content_description="AI fracture finding, to be confirmed",
        graphic_annotations=[annotation], graphic_layers=[layer],
        voi_lut_transformations=_voi(window),
        presentation_lut_transformation=PresentationLUTTransformation(
            presentation_lut_shape=_shape(source)),
    )
    apply_identity(identity_of(source), gsps)
    # Type 2C for paired body parts; series level, hence a series per laterality (series_uid).
    gsps.Laterality = laterality_of(source)
    gsps.SeriesDescription = GSPS_SERIES_DESCRIPTION
    apply_series_context(source, gsps)
    gsps.add_new(0x00181020, "LO", [f"dicomai {__version__}", f"{manifest.name} {manifest.version}"[:64]])
    return gsps


def _reference(source: Dataset) -> Dataset:
    """The source's header without its pixels, with a clean patient and study (a source
    lacking or breaking a Type 2 attribute still gets its presentation state)."""
    ref = Dataset()
    for elem in source:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            ref.add(elem)
    apply_identity(identity_of(source), ref)
    return ref


def _voi(window: Window | None) -> list[SoftcopyVOILUTTransformation] | None:
    """The analysis's own window when the file has none; None: highdicom copies the file's."""
    if window is None or window.source != WindowSource.PERCENTILE or window.width <= 0:
        return None
    return [SoftcopyVOILUTTransformation(window_center=round(window.center, 2),
                                         window_width=max(1.0, round(window.width, 2)),
                                         window_explanation="dicomai percentile window")]


def _shape(source: Dataset) -> PresentationLUTShapeValues:
    """INVERSE for MONOCHROME1: a presentation state's output is P-values (0 = black), and
    the Presentation LUT, not the image's photometric interpretation, decides the polarity."""
    photometric = str(source.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    return PresentationLUTShapeValues.INVERSE if photometric == "MONOCHROME1" else (
        PresentationLUTShapeValues.IDENTITY)


def _beside(region: tuple[int, int, int, int], rows: int, columns: int) -> tuple[float, float, float, float]:
    """A text box just above the outline (below it when the outline touches the top), as wide
    as a short caption needs, kept inside the image."""
    c0, r0, _, r1 = region
    height = max(8.0, rows * 0.035)
    width = min(float(columns), max(columns * 0.45, height * 12))
    left = min(float(c0), columns - width)
    top = r0 - height - 2 if r0 - height - 2 >= 0 else min(r1 + 2.0, rows - height)
    return (left, max(0.0, top), left + width, max(0.0, top) + height)
