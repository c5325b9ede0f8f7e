"""Tests of the scope rules that decide which images the model analyses."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomai.analysis.scope import out_of_scope
from dicomai.config import ScopeConfig
from tests.helpers import pydicom_data

PARTS = ["HAND", "WRIST", "EXTREMITY", "HIP"]


def _cr() -> Dataset:
    return dcmread(pydicom_data("RG3_UNCR.dcm"), stop_before_pixels=True)


def test_cr_extremity_in_scope() -> None:
    """A CR of an extremity, DERIVED\\PRIMARY or ORIGINAL, is analysed."""
    ds = _cr()
    assert out_of_scope(ds, ScopeConfig(), PARTS) is None
    ds.ImageType = ["DERIVED", "PRIMARY"]
    assert out_of_scope(ds, ScopeConfig(), PARTS) is None


@pytest.mark.parametrize(("change", "reason"), [
    ({"Manufacturer": "dicomai"}, "own result"),
    ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "SOP class"),
    ({"Modality": "OT"}, "modality"),
    ({"NumberOfFrames": 3}, "multi-frame"),
    ({"ImageType": ["DERIVED", "SECONDARY"]}, "secondary"),
    ({"Rows": 64}, "too small"),
    ({"BodyPartExamined": "CHEST"}, "body part not analysed: CHEST"),
])
def test_out_of_scope_reasons(change: dict[str, object], reason: str) -> None:
    """Each rule gives its own readable reason."""
    ds = _cr()
    for k, v in change.items():
        setattr(ds, k, v)
    got = out_of_scope(ds, ScopeConfig(), PARTS)
    assert got is not None and reason in got


def test_unknown_or_empty_body_part_is_analysed_unless_configured() -> None:
    """Empty or site-specific body parts are analysed by default, refused when configured."""
    ds = _cr()
    ds.BodyPartExamined = "LEFT PINKY"
    assert out_of_scope(ds, ScopeConfig(), PARTS) is None
    ds.BodyPartExamined = ""
    assert out_of_scope(ds, ScopeConfig(), PARTS) is None
    strict = ScopeConfig(analyse_unknown_body_part=False)
    assert out_of_scope(ds, strict, PARTS) == "body part not given"
    ds.BodyPartExamined = "LEFT PINKY"
    assert out_of_scope(ds, strict, PARTS) == "body part not analysed: LEFTPINKY"


def test_configured_body_parts_override_the_model() -> None:
    """scope.body_parts replaces the model's list."""
    ds = _cr()
    ds.BodyPartExamined = "CHEST"
    assert out_of_scope(ds, ScopeConfig(body_parts=["CHEST"]), PARTS) is None
