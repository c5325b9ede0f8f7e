"""Simple statistics of an analysed image, for the drift watch. Pure functions.

A site's images differ from the validation set's in ways a score distribution shows late:
the equipment (manufacturer), the matrix (size), the bit depth, and how bright the
radiograph is once windowed. These are cheap to take while the image is at hand.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

__all__ = ["ImageStats", "image_stats"]


@dataclass(frozen=True)
class ImageStats:
    """What the drift watch keeps about one analysed image."""

    rows: int
    columns: int
    bits_stored: int
    mean_intensity: float  # mean of the displayed image (windowed, MONOCHROME2), in [0, 1]
    manufacturer: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> ImageStats:
        return cls(rows=int(value["rows"]), columns=int(value["columns"]),
                   bits_stored=int(value["bits_stored"]), mean_intensity=float(value["mean_intensity"]),
                   manufacturer=value.get("manufacturer"))


def image_stats(ds: Dataset, display: NDArray[np.floating]) -> ImageStats:
    """The statistics of ``ds`` as the node displayed it (``display``: [0, 1], bone bright)."""
    manufacturer = str(ds.get("Manufacturer", "") or "").strip()[:64] or None
    return ImageStats(rows=int(display.shape[0]), columns=int(display.shape[1]),
                      bits_stored=int(ds.get("BitsStored", 8) or 8),
                      mean_intensity=round(float(np.mean(display, dtype=np.float64)), 5),
                      manufacturer=manufacturer)
