"""The try page's analysis: one uploaded radiograph through the node's own analyser, in memory.

Nothing of an upload is kept: the bytes come from the request's memory, are analysed and
drawn, and are forgotten with the response. No database row, no spool file, no result
object, nothing queued for a PACS, no audit event (the upload may carry a patient's name).
"""

from __future__ import annotations

import io
import threading
import time
import warnings
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom import dcmread

from dicomai.analysis.image import Analyser, ImageAnalysis, short_reason
from dicomai.config import Settings
from dicomai.errors import DicomaiError
from dicomai.model.grading import Grade
from dicomai.model.package import OperatingPoints
from dicomai.web.pictures import MAX_SIDE, overlay_picture, png

__all__ = ["MAX_PIXELS", "MAX_UPLOAD_BYTES", "Demo", "DemoResult", "FileKind", "UploadError", "file_kind"]

#: The largest file the try page takes.
MAX_UPLOAD_BYTES = 64 * 2**20
#: The most pixels a PNG or JPEG may have (a small file can hold a huge image).
MAX_PIXELS = 60_000_000


class UploadError(DicomaiError):
    """An upload the try page cannot analyse; the message says why, for the person who sent it."""

    exit_code = 1

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class FileKind(StrEnum):
    DICOM = "DICOM"
    PNG = "PNG"
    JPEG = "JPEG"


def file_kind(data: bytes) -> FileKind | None:
    """What a file is, by its first bytes (DICOM Part 10 preamble, PNG or JPEG signature)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return FileKind.DICOM
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return FileKind.PNG
    if data.startswith(b"\xff\xd8\xff"):
        return FileKind.JPEG
    return None


def _display(data: bytes) -> np.ndarray:
    """A PNG or JPEG radiograph as displayed grey levels in [0, 1]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise UploadError(f"the image has {im.width} x {im.height} pixels; at most "
                                      f"{MAX_PIXELS // 1_000_000} million are analysed here", 413)
                return np.asarray(im.convert("L"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning,
            ValueError) as exc:
        raise UploadError(short_reason("cannot read the image", exc)) from None


@dataclass(frozen=True)
class DemoResult:
    """What the model made of an upload; ``picture`` is the PNG with its heat map, if analysed."""

    kind: FileKind
    grade: Grade
    probability: float | None
    reason: str | None
    points: OperatingPoints | None
    picture: bytes | None
    seconds: float

    @property
    def analysed(self) -> bool:
        return self.grade in (Grade.POSITIVE, Grade.DOUBTFUL, Grade.NEGATIVE)


class Demo:
    """The try page: uploads analysed one at a time by the node's own analyser.

    The console serves from the node's process, so the try page grades with the very
    analyser (network, scope rules, operating points) that grades the node's studies: no
    second copy of the network in memory, and no way for the page to disagree with the node.
    One upload at a time leaves the node's CPUs to the studies.
    """

    def __init__(self, settings: Settings, analyser: Analyser) -> None:
        self.settings = settings
        self.analyser = analyser
        self.max_bytes = MAX_UPLOAD_BYTES
        self._lock = threading.Lock()

    def analyse(self, data: bytes) -> DemoResult:
        """Grade an upload as the node would grade it (its scope rules included for DICOM).

        Raises
        ------
        UploadError
            Not a DICOM, PNG or JPEG file, or one that cannot be read.
        """
        if len(data) > self.max_bytes:
            raise UploadError(f"the file is larger than {self.max_bytes / 2**20:.0f} MB", 413)
        kind = file_kind(data)
        if kind is None:
            raise UploadError("not a DICOM (Part 10), PNG or JPEG file")
        started = time.perf_counter()
        with self._lock:
            if kind == FileKind.DICOM:
                try:
                    ds = dcmread(io.BytesIO(data))
                except Exception as exc:  # noqa: BLE001 -- any parser failure is this file's error
                    raise UploadError(short_reason("cannot read the DICOM file", exc)) from None
                result = self.analyser.analyse([ds])[0]
            else:
                result = self.analyser.analyse_display(_display(data))
            picture = self._picture(result)
        return DemoResult(kind, result.grade, result.probability, result.reason, result.points, picture,
                          time.perf_counter() - started)

    def _picture(self, result: ImageAnalysis) -> bytes | None:
        if not result.analysed or result.display is None:
            return None
        cam = result.gradcam.on_image() if result.gradcam is not None else None
        r = self.settings.results
        return png(overlay_picture(result.display, cam, MAX_SIDE, r.opacity, r.floor))
