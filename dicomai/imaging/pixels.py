"""From DICOM pixel data to the model's input, and model maps back to the image.

Pure functions over numpy arrays (decoding aside, which pydicom does with the pylibjpeg
plugins, or GDCM when installed):

1. :func:`decode`: the stored pixel values of a single-frame image.
2. :func:`to_display`: Pixel Padding, Modality LUT, VOI window or LUT (the file's first by
   default; a robust percentile window when the file has none), MONOCHROME1 inversion:
   a float32 image in [0, 1] with bone bright, as a radiologist's viewer shows it.
3. :func:`letterbox`: aspect-preserving resize into the model's input size, with the
   :class:`Letterbox` geometry that :func:`unletterbox` uses to draw a map (Grad-CAM)
   back onto the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import JPEGLSTransferSyntaxes

from dicomai.errors import DicomaiError

__all__ = [
    "Display",
    "Letterbox",
    "NormalizeError",
    "Window",
    "WindowSource",
    "decode",
    "letterbox",
    "percentile_window",
    "resize",
    "to_display",
    "unletterbox",
    "window_linear",
]

FloatImage = NDArray[np.float32]


class NormalizeError(DicomaiError):
    """The pixel data cannot be turned into an image (unsupported, corrupt, empty)."""


class WindowSource(StrEnum):
    FILE = "file"  # Window Center/Width from the data set
    VOI_LUT = "voi_lut"  # VOI LUT Sequence from the data set
    PERCENTILE = "percentile"  # computed: robust percentiles of the non-padding pixels
    NONE = "none"  # colour images: no window


@dataclass(frozen=True)
class Window:
    """A VOI window in the units after the Modality LUT."""

    center: float
    width: float
    source: WindowSource


@dataclass(frozen=True)
class Display:
    """A radiograph as displayed: float32 in [0, 1], bone bright; plus how it was made."""

    image: FloatImage
    window: Window
    padding: NDArray[np.bool_] | None  # True where Pixel Padding Value marked no data


def decode(ds: Dataset) -> NDArray[np.generic]:
    """Stored pixel values of a single-frame image (RGB for colour images).

    Raises
    ------
    NormalizeError
        With a readable reason: no pixel data, empty image, multi-frame, undecodable.
    """
    if "PixelData" not in ds:
        raise NormalizeError("no pixel data")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows == 0 or cols == 0:
        raise NormalizeError(f"empty image ({rows}x{cols})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise NormalizeError(f"multi-frame image ({frames} frames)")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    # Preferred decoders (fastest measured here), then pydicom's whole chain (GDCM included)
    # as the fallback.
    plugins = ["pyjpegls"] if ts in JPEGLSTransferSyntaxes else ["pylibjpeg"]
    errors: list[str] = []
    arr = None
    for plugin in [*plugins, ""]:
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            arr = ds.pixel_array
            break
        except Exception as exc:  # plugins raise many types; the messages are what matter
            errors.append(f"{plugin or 'any'}: {exc}")
    if arr is None:
        name = getattr(ts, "name", str(ts))
        raise NormalizeError(f"cannot decode pixel data ({name}): {errors[-1]}")
    if arr.shape[:2] != (rows, cols):
        raise NormalizeError(f"decoded shape {arr.shape} does not match {rows}x{cols}")
    return arr


def window_linear(values: NDArray[np.floating], center: float, width: float) -> FloatImage:
    """DICOM LINEAR VOI function (PS3.3 C.11.2.1.2.1) mapped onto [0, 1]."""
    if width < 1:
        raise NormalizeError(f"window width {width} < 1")
    if width == 1:
        return (values >= center - 0.5).astype(np.float32)
    # float32 and in place: this runs on every pixel of multi-megapixel radiographs.
    out = np.array(values, dtype=np.float32, copy=True)
    out -= np.float32(center - 0.5)
    out *= np.float32(1.0 / (width - 1))
    out += np.float32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out


def percentile_window(values: NDArray[np.floating], mask: NDArray[np.bool_] | None = None,
                      low: float = 0.5, high: float = 99.5) -> Window:
    """A window spanning the [low, high] percentiles of the (non-padding) pixels."""
    data = values[~mask] if mask is not None else values.ravel()
    if data.size == 0:
        raise NormalizeError("every pixel is padding")
    if data.size > 1_000_000:  # a regular subsample estimates percentiles just as well
        data = data[:: data.size // 1_000_000]
    lo, hi = np.percentile(data, [low, high])
    width = max(float(hi - lo), 1.0) + 1.0
    return Window(center=float(lo) + (width - 1) / 2 + 0.5, width=width,
                  source=WindowSource.PERCENTILE)


def _padding_mask(ds: Dataset, stored: NDArray[np.generic]) -> NDArray[np.bool_] | None:
    if "PixelPaddingValue" not in ds:
        return None
    a = int(ds.PixelPaddingValue)
    b = int(ds.get("PixelPaddingRangeLimit", a))
    lo, hi = min(a, b), max(a, b)
    mask: NDArray[np.bool_] = np.greater_equal(stored, lo) & np.less_equal(stored, hi)
    return mask if mask.any() else None


def _values(value: object) -> list[float]:
    return [float(v) for v in value] if isinstance(value, MultiValue) else [float(value)]  # type: ignore[arg-type]


def _file_window(ds: Dataset, index: int) -> Window | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    centers, widths = _values(ds.WindowCenter), _values(ds.WindowWidth)
    if index >= min(len(centers), len(widths)):
        return None
    width = float(widths[index])
    if width < 1:
        return None
    return Window(center=float(centers[index]), width=width, source=WindowSource.FILE)


def to_display(ds: Dataset, stored: NDArray[np.generic] | None = None, window_index: int = 0,
               window: Window | None = None) -> Display:
    """The image as a viewer shows it, in [0, 1], bone bright.

    Parameters
    ----------
    ds:
        The data set (for LUTs, windows, photometric interpretation, padding).
    stored:
        Decoded stored values; decoded from ``ds`` when omitted.
    window_index:
        Which of the file's windows (or VOI LUTs) to use.
    window:
        Force this window (in post-Modality-LUT units) instead of the file's.
    """
    arr = decode(ds) if stored is None else stored
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if arr.ndim == 3:  # colour radiograph: pydicom already converted YBR to RGB
        if arr.shape[2] != 3:
            raise NormalizeError(f"unsupported sample layout {arr.shape}")
        bits = int(ds.get("BitsStored", 8))
        rgb = arr.astype(np.float32) / float(2**bits - 1)
        gray = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return Display(np.clip(gray, 0, 1).astype(np.float32), Window(0.5, 1.0, WindowSource.NONE), None)
    if not photometric.startswith("MONOCHROME"):
        raise NormalizeError(f"unsupported photometric interpretation {photometric}")
    mask = _padding_mask(ds, arr)
    values = np.asarray(apply_modality_lut(arr, ds))
    chosen = window or _file_window(ds, window_index)
    if chosen is not None:
        image = window_linear(values, chosen.center, chosen.width)
    elif "VOILUTSequence" in ds and len(ds.VOILUTSequence) > window_index:
        lut = ds.VOILUTSequence[window_index]
        bits = int(lut.LUTDescriptor[2]) or 16
        mapped = apply_voi_lut(values.astype(arr.dtype) if values.dtype != arr.dtype else values, ds,
                               index=window_index, prefer_lut=True)
        image = np.clip(np.asarray(mapped, dtype=np.float64) / float(2**bits - 1), 0, 1).astype(np.float32)
        chosen = Window(0.5, 1.0, WindowSource.VOI_LUT)
    else:
        chosen = percentile_window(values, mask)
        image = window_linear(values, chosen.center, chosen.width)
    if photometric == "MONOCHROME1":
        np.subtract(np.float32(1.0), image, out=image)
    if mask is not None:
        image[mask] = 0.0
    return Display(image.astype(np.float32, copy=False), chosen, mask)


def resize(image: FloatImage, height: int, width: int) -> FloatImage:
    """Bilinear (antialiased when shrinking) resize of a 2-D float image."""
    if image.shape == (height, width):
        return image.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    # reducing_gap: shrink by an integer box filter first, then resample; same result to the
    # eye, several times faster on multi-megapixel inputs.
    gap = 3.0 if image.shape[0] > 3 * height and image.shape[1] > 3 * width else None
    resized = pil.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=gap)
    return np.asarray(resized, dtype=np.float32)


@dataclass(frozen=True)
class Letterbox:
    """Where an image of ``src_h x src_w`` lies inside the model input ``dst_h x dst_w``."""

    src_h: int
    src_w: int
    dst_h: int
    dst_w: int
    new_h: int
    new_w: int
    top: int
    left: int


def letterbox(image: FloatImage, height: int, width: int, pad: float = 0.0) -> tuple[FloatImage, Letterbox]:
    """Resize keeping the aspect ratio, centred on a ``pad``-filled canvas."""
    if image.ndim != 2 or min(image.shape) < 1:
        raise NormalizeError(f"cannot letterbox an image of shape {image.shape}")
    src_h, src_w = image.shape
    scale = min(height / src_h, width / src_w)
    new_h, new_w = max(1, round(src_h * scale)), max(1, round(src_w * scale))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas = np.full((height, width), pad, dtype=np.float32)
    canvas[top:top + new_h, left:left + new_w] = resize(image, new_h, new_w)
    return canvas, Letterbox(src_h, src_w, height, width, new_h, new_w, top, left)


def unletterbox(map_: FloatImage, geom: Letterbox) -> FloatImage:
    """A map over the model input (any resolution) drawn back onto the original image."""
    if map_.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {map_.shape}")
    full = resize(map_.astype(np.float32), geom.dst_h, geom.dst_w)
    crop = full[geom.top:geom.top + geom.new_h, geom.left:geom.left + geom.new_w]
    return resize(crop, geom.src_h, geom.src_w)
