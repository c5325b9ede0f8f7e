"""Tests of model package loading and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicomai.model.package import ModelError, load_package
from tests.synthetic import hot_spot_model


def test_valid_package_loads(tmp_path: Path) -> None:
    """A consistent package loads; its hash is checked."""
    pkg = load_package(hot_spot_model(tmp_path / "m"))
    assert pkg.manifest.positive_index == 1
    assert pkg.manifest.operating_points.high_specificity == 0.7


def test_wrong_hash_is_refused(tmp_path: Path) -> None:
    """A model.onnx that does not match the manifest's sha256 is refused, naming both."""
    d = hot_spot_model(tmp_path / "m")
    with open(d / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ModelError, match="does not match the manifest"):
        load_package(d)


@pytest.mark.parametrize(("patch", "message"), [
    ({"positive_class": "broken"}, "positive_class"),
    ({"operating_points": {"high_sensitivity": 0.9, "high_specificity": 0.1}}, "operating_points"),
    ({"preprocessing": {"mean": [0], "std": [1]}}, "mean/std"),
    ({"surprise": 1}, "surprise"),
    ({"weights": "int8"}, "weights"),
])
def test_inconsistent_manifest_is_refused(tmp_path: Path, patch: dict[str, object], message: str) -> None:
    """An inconsistent manifest is refused with the field named."""
    d = hot_spot_model(tmp_path / "m")
    data = json.loads((d / "model.json").read_text())
    data.update(patch)
    (d / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message):
        load_package(d)
