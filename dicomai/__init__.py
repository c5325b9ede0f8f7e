"""dicomai: a DICOM AI node for bone-fracture triage on radiographs."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dicomai")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
