"""Tests of pixel normalization against independent decoders, and of the letterbox geometry."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from dicomai.imaging.pixels import (
    NormalizeError,
    WindowSource,
    decode,
    letterbox,
    to_display,
    unletterbox,
    window_linear,
)
from tests.helpers import dcmtk, missing, pydicom_data, shared_file

FILES = [
    ("shared", "RG2_JPLL.dcm"), ("shared", "RG1_JLSN.dcm"),
    ("shared", "JPEGExtended_1s_1f_u_16_12.dcm"), ("shared", "dx_image.dcm"),
    ("pydicom", "RG3_UNCR.dcm"), ("pydicom", "RG1_UNCR.dcm"),
    ("pydicom", "RG3_J2KR.dcm"), ("pydicom", "RG3_J2KI.dcm"),
]


LOSSY = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless}


def _path(origin: str, name: str) -> Path:
    return shared_file(name) if origin == "shared" else pydicom_data(name)


def _reference(path: Path, center: float, width: float, tmp: Path) -> np.ndarray:
    """8-bit rendering by dcmtk with the same window (GDCM decompresses JPEG 2000 first)."""
    ts = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    src = path
    if ts in (JPEG2000, JPEG2000Lossless):
        gdcmconv = shutil.which("gdcmconv", path="/usr/bin")
        if gdcmconv is None:
            missing("gdcmconv (apt-get install libgdcm-tools)")
        src = tmp / "raw.dcm"
        subprocess.run([gdcmconv, "--raw", str(path), str(src)], check=True, capture_output=True)
    tool = "dcml2pnm" if ts in (JPEGLSLossless, JPEGLSNearLossless) else "dcmj2pnm"
    out = tmp / "ref.pgm"
    subprocess.run([dcmtk(tool), "+Ww", f"{center}", f"{width}", "+op", str(src), str(out)],
                   check=True, capture_output=True)
    return np.asarray(Image.open(out), dtype=np.float32)


@pytest.mark.integration
@pytest.mark.parametrize(("origin", "name"), FILES, ids=[n for _, n in FILES])
def test_display_matches_independent_decoder(origin: str, name: str, tmp_path: Path) -> None:
    """Decoded, LUT-ed, windowed, MONOCHROME1-inverted pixels match dcmtk/GDCM's rendering."""
    path = _path(origin, name)
    shown = to_display(dcmread(path))
    ref = _reference(path, shown.window.center, shown.window.width, tmp_path)
    ours = shown.image * 255.0
    assert ours.shape == ref.shape
    diff = np.abs(ours - ref)
    # Rounding to 8 bits allows 1 level. Lossy decoders (IDCT precision) may also differ by
    # one stored unit, i.e. 255 / (width - 1) display levels.
    ts = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    lossy = ts in LOSSY
    limit = 1.5 + (255.0 / (shown.window.width - 1) if lossy else 0.0)
    assert float(diff.mean()) < 0.75, f"mean |diff| {diff.mean():.3f}"
    assert float(np.percentile(diff, 99.9)) <= limit, f"p99.9 |diff| {np.percentile(diff, 99.9):.2f}"


@pytest.mark.parametrize("name", ["RG1_UNCR.dcm", "RG3_UNCR.dcm"])
def test_monochrome1_bone_is_bright(name: str) -> None:
    """MONOCHROME1 (low stored value = bright) comes out with the low stored values bright."""
    ds = dcmread(pydicom_data(name))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    stored = decode(ds).astype(np.float64)
    img = to_display(ds).image
    lo, hi = np.percentile(stored, [5, 95])
    assert img[stored <= lo].mean() > img[stored >= hi].mean() + 0.3


def test_percentile_window_when_file_has_none() -> None:
    """Without a window in the file a robust percentile window is used and recorded."""
    ds = dcmread(shared_file("JPEGExtended_1s_1f_u_16_12.dcm"))
    assert "WindowCenter" not in ds
    shown = to_display(ds)
    assert shown.window.source == WindowSource.PERCENTILE
    assert shown.image.min() >= 0.0 and shown.image.max() <= 1.0
    assert (shown.image >= 0.999).mean() < 0.01  # ~0.5% saturate at each end


def test_padding_value_is_black(tmp_path: Path) -> None:
    """Pixels equal to Pixel Padding Value are black whatever the window says."""
    ds = dcmread(pydicom_data("RG3_UNCR.dcm"))
    arr = decode(ds).copy()
    arr[:100, :100] = 0
    ds.PixelData = arr.tobytes()
    ds.PixelPaddingValue = 0
    shown = to_display(ds)
    assert shown.padding is not None and shown.padding[:100, :100].all()
    assert (shown.image[:100, :100] == 0).all()


def test_signed_and_rgb_inputs() -> None:
    """Signed stored values go through the Modality LUT; RGB becomes luminance."""
    ds = dcmread(shared_file("dx_image.dcm"))
    arr = decode(ds).astype(np.int16) - 128
    ds.PixelRepresentation, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PixelData = arr.tobytes()
    ds.RescaleIntercept, ds.RescaleSlope = 128, 1
    ref = to_display(dcmread(shared_file("dx_image.dcm"))).image
    np.testing.assert_allclose(to_display(ds).image, ref, atol=1e-6)
    rgb = np.stack([decode(dcmread(shared_file("dx_image.dcm")))] * 3, axis=-1)
    ds2 = dcmread(shared_file("dx_image.dcm"))
    ds2.SamplesPerPixel, ds2.PhotometricInterpretation, ds2.PlanarConfiguration = 3, "RGB", 0
    ds2.PixelData = rgb.astype(np.uint8).tobytes()
    gray = to_display(ds2).image
    np.testing.assert_allclose(gray, rgb[..., 0] / 255.0, atol=1e-5)


def test_bad_pixels_raise_readable_errors() -> None:
    """Zero-size, multi-frame and corrupt compressed data raise NormalizeError with a reason."""
    ds = dcmread(shared_file("dx_image.dcm"))
    ds.Rows = 0
    with pytest.raises(NormalizeError, match="empty image"):
        decode(ds)
    ds = dcmread(shared_file("dx_image.dcm"))
    ds.NumberOfFrames = 2
    with pytest.raises(NormalizeError, match="multi-frame"):
        decode(ds)
    ds = dcmread(shared_file("RG2_JPLL.dcm"))
    from pydicom.encaps import encapsulate

    # Marker soup after the SOI marker. (libjpeg decodes a lossless stream that is merely cut
    # short without complaint; ingest's completeness check is what catches truncation.)
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(256)) * 4])
    with pytest.raises(NormalizeError, match="cannot decode"):
        decode(ds)


def test_window_linear_follows_dicom() -> None:
    """LINEAR VOI: c-0.5-(w-1)/2 maps to 0, c-0.5+(w-1)/2 to 1 (PS3.3 C.11.2.1.2.1)."""
    out = window_linear(np.array([0.0, 49.5, 99.0, 200.0]), center=50, width=100)
    np.testing.assert_allclose(out, [0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_letterbox_round_trip_keeps_a_hot_spot_in_place() -> None:
    """A spot in a tall, non-square image lands where it was after letterbox + unletterbox."""
    img = np.zeros((300, 120), np.float32)
    img[210:230, 80:100] = 1.0  # lower right
    boxed, geom = letterbox(img, 224, 224)
    assert (geom.new_h, geom.new_w) == (224, 90) and geom.left == 67 and geom.top == 0
    assert boxed[:, :60].max() == 0.0  # padding stays empty
    back = unletterbox(boxed, geom)
    assert back.shape == img.shape
    y, x = np.unravel_index(np.argmax(back), back.shape)
    assert 205 <= y <= 235 and 75 <= x <= 105
    coarse = unletterbox(boxed[::32, ::32], geom)  # a 7x7 map, as Grad-CAM gives
    y, x = np.unravel_index(np.argmax(coarse), coarse.shape)
    assert y > 150 and x > 60
