"""The model package: a folder with ``model.onnx`` and its manifest ``model.json``.

The manifest says how to feed the model (input name, size, layout, preprocessing), what
comes out (probabilities, optional in-graph Grad-CAM map), how to grade it (labels,
positive class, the two operating points) and where it came from (training data, metrics).
:func:`load_package` checks the ONNX file's sha256 and the manifest's consistency; a bad
package raises :class:`ModelError`, which stops the node at start.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dicomai.errors import DicomaiError

__all__ = [
    "IntensityReference",
    "InputSpec",
    "Manifest",
    "ModelError",
    "ModelPackage",
    "OperatingPoints",
    "Outputs",
    "Preprocessing",
    "Reference",
    "ScoreReference",
    "StrictModel",
    "load_package",
    "sha256_file",
]


class ModelError(DicomaiError):
    """A model package is missing, inconsistent or does not match its hash."""

    exit_code = 2

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"model package {path}: {message}")
        self.path = path


class StrictModel(BaseModel):
    """A manifest-like JSON object: unknown keys refused, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(StrictModel):
    name: str
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3] = 3
    layout: Literal["NCHW"] = "NCHW"


class Preprocessing(StrictModel):
    resize: Literal["letterbox"] = "letterbox"
    pad_value: float = 0.0
    mean: list[float]
    std: list[float]


class Outputs(StrictModel):
    probabilities: str
    gradcam: str | None = None


class OperatingPoints(StrictModel):
    """Probability thresholds: doubtful at or above the first, positive at or above the second."""

    high_sensitivity: float = Field(ge=0, le=1)
    high_specificity: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> OperatingPoints:
        if self.high_sensitivity > self.high_specificity:
            raise ValueError("high_sensitivity threshold must not exceed high_specificity")
        return self


class _EqualCountBins(StrictModel):
    """Where a validation set's values fall, for the drift watch (``dicomai model drift``).

    ``edges`` are the inner edges of equal-count bins (the deciles: 9 edges, 10 bins), so each
    bin held ``1 / (len(edges) + 1)`` of the validation images.
    """

    edges: list[float] = Field(min_length=1)
    images: int = Field(gt=0)
    data: str

    @model_validator(mode="after")
    def _increasing(self) -> Self:
        if any(b < a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("reference edges must not decrease")
        return self


class ScoreReference(_EqualCountBins):
    """The validation set's probabilities, and the share of them flagged at each operating point."""

    high_sensitivity_rate: float = Field(ge=0, le=1)
    high_specificity_rate: float = Field(ge=0, le=1)


class IntensityReference(_EqualCountBins):
    """The validation images' mean intensities (displayed, windowed, in [0, 1])."""


class Reference(StrictModel):
    """Reference distributions of the validation set."""

    scores: ScoreReference
    intensity: IntensityReference | None = None


# how model.onnx may store its weights (`train release --weights`); the graph computes in float32
WeightStorage = Literal["float32", "float16"]
WEIGHT_STORAGE: tuple[str, ...] = get_args(WeightStorage)


class Manifest(StrictModel):
    name: str
    version: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    input: InputSpec
    preprocessing: Preprocessing
    outputs: Outputs
    labels: list[str] = Field(min_length=2)
    positive_class: str
    operating_points: OperatingPoints
    body_parts: list[str] = Field(default_factory=list)
    weights: WeightStorage = "float32"
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    reference: Reference | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        if self.positive_class not in self.labels:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of labels")
        n = self.input.channels
        if len(self.preprocessing.mean) != n or len(self.preprocessing.std) != n:
            raise ValueError(f"preprocessing mean/std need {n} values (input channels)")
        if any(s <= 0 for s in self.preprocessing.std):
            raise ValueError("preprocessing std values must be positive")
        return self

    @property
    def positive_index(self) -> int:
        return self.labels.index(self.positive_class)


class ModelPackage(BaseModel):
    model_config = ConfigDict(frozen=True)

    directory: Path
    manifest: Manifest

    @property
    def onnx_path(self) -> Path:
        return self.directory / "model.onnx"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_package(directory: Path, check_hash: bool = True) -> ModelPackage:
    """Read and validate a model package.

    Raises
    ------
    ModelError
        Missing files, invalid manifest (naming the field) or a hash mismatch.
    """
    manifest_path, onnx_path = directory / "model.json", directory / "model.onnx"
    for p in (manifest_path, onnx_path):
        if not p.is_file():
            raise ModelError(directory, f"missing {p.name}")
    try:
        manifest = Manifest.model_validate(json.loads(manifest_path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as exc:
        raise ModelError(directory, f"model.json is not valid JSON: {exc}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"]) or "(root)"
        raise ModelError(directory, f"model.json: {where}: {err['msg']}") from None
    if check_hash:
        actual = sha256_file(onnx_path)
        if actual != manifest.sha256:
            raise ModelError(directory, f"model.onnx sha256 {actual} does not match the "
                                        f"manifest's {manifest.sha256}")
    return ModelPackage(directory=directory, manifest=manifest)
