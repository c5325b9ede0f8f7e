"""Tests of the scope rules that decide which images the model analyses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import config, dcmread
from pydicom.dataset import Dataset

from dicomai.analysis.scope import KNOWN_BODY_PARTS, out_of_scope
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
    ({"BodyPartExamined": "CHEST"}, "body part not analysed: CHEST (outside the model's validated scope)"),
])
def test_out_of_scope_reasons(change: dict[str, object], reason: str) -> None:
    """Each rule gives its own readable reason."""
    ds = _cr()
    for k, v in change.items():
        setattr(ds, k, v)
    got = out_of_scope(ds, ScopeConfig(), PARTS)
    assert got is not None and reason in got


@pytest.mark.parametrize(("value", "reason"), [
    ("HAND RIGHT", None),  # a site's spelling of a validated part: its words name only HAND
    ("L_Wrist", None),
    ("Left Hip", None),
    ("Lower Leg", "body part not analysed: LOWERLEG (outside the model's validated scope)"),
    ("ELBOW LEFT", "body part not analysed: ELBOWLEFT (ELBOW: outside the model's validated scope)"),
    ("CHEST PA", "body part not analysed: CHESTPA (CHEST: outside the model's validated scope)"),
    ("HAND ELBOW", "body part not analysed: HANDELBOW (ELBOW: outside the model's validated scope)"),
    ("SCHULTER", "body part not analysed: SCHULTER (not a recognised value: outside the model's "
                 "validated scope; see scope.body_part_aliases and scope.analyse_unknown_body_part)"),
    # two words that make a term are that term, not their last word
    ("UPPER-LEG", "body part not analysed: UPPER-LEG (UPPERLEG: outside the model's validated scope)"),
    ("Upper Leg Right", "body part not analysed: UPPERLEGRIGHT (UPPERLEG: outside the model's "
                        "validated scope)"),
    ("L_UPPER_LEG", "body part not analysed: LUPPERLEG (UPPERLEG: outside the model's validated scope)"),
])
def test_site_spellings_are_read_by_their_words_and_unrecognised_ones_refused(
        value: str, reason: str | None) -> None:
    """A value that is no defined term is judged by the defined terms among its words; one
    with none is refused by default (fail closed), analysed only when configured."""
    ds = _cr()
    with config.disable_value_validation():  # lower case: as some modalities send it
        ds.BodyPartExamined = value
    assert out_of_scope(ds, ScopeConfig(), PARTS) == reason
    if reason is not None and "not a recognised value" in reason:
        assert out_of_scope(ds, ScopeConfig(analyse_unknown_body_part=True), PARTS) is None


def test_empty_body_part_is_analysed_unless_configured() -> None:
    """Many CR and DX images leave Body Part Examined empty: analysed by default, refused when
    configured, also by a configuration that refuses unknown values and says nothing of empty ones."""
    ds = _cr()
    ds.BodyPartExamined = ""
    assert out_of_scope(ds, ScopeConfig(), PARTS) is None
    assert out_of_scope(ds, ScopeConfig(analyse_empty_body_part=False), PARTS) == "body part not given"
    assert out_of_scope(ds, ScopeConfig(analyse_unknown_body_part=False), PARTS) == "body part not given"
    del ds.BodyPartExamined
    assert out_of_scope(ds, ScopeConfig(analyse_empty_body_part=False), PARTS) == "body part not given"
    assert out_of_scope(ds, ScopeConfig(analyse_unknown_body_part=False, analyse_empty_body_part=True),
                        PARTS) is None


def test_configured_body_parts_override_the_model() -> None:
    """scope.body_parts replaces the model's list."""
    ds = _cr()
    ds.BodyPartExamined = "CHEST"
    assert out_of_scope(ds, ScopeConfig(body_parts=["CHEST"]), PARTS) is None
    ds.BodyPartExamined = "HAND"
    assert out_of_scope(ds, ScopeConfig(body_parts=["CHEST"]), PARTS) == (
        "body part not analysed: HAND (not in scope.body_parts)")


#: FracAtlas's regions (hand, leg, hip, shoulder) as the views a site sends them under.
VALIDATED = {"HAND", "HANDS", "FINGER", "THUMB", "WRIST", "LEG", "LOWERLEG", "TIBIA", "FIBULA", "KNEE",
             "ANKLE", "FOOT", "FEET", "TOE", "HIP", "PELVIS", "SHOULDER"}


def test_shipped_model_lists_only_its_validated_body_parts() -> None:
    """The shipped manifest names FracAtlas's regions; elbow, forearm, humerus are left out."""
    from dicomai.model.package import load_package
    from dicomai.node import default_model_dir

    model = default_model_dir()
    assert model is not None
    parts = set(load_package(model, check_hash=False).manifest.body_parts)
    assert parts == VALIDATED
    assert parts <= KNOWN_BODY_PARTS


def test_body_part_outside_the_manifest_is_not_analysed(tmp_path: Path) -> None:
    """Through the node's analysis: an elbow is not analysed, with the reason; a hand is."""
    from dicomai.analysis.image import Analyser
    from dicomai.model.classifier import Classifier
    from dicomai.model.grading import Grade
    from dicomai.model.package import load_package
    from tests.synthetic import hot_spot_model

    directory = hot_spot_model(tmp_path / "model")
    manifest = json.loads((directory / "model.json").read_text())
    manifest["body_parts"] = sorted(VALIDATED)
    (directory / "model.json").write_text(json.dumps(manifest))
    package = load_package(directory)
    analyser = Analyser(ScopeConfig(), package, Classifier(package, threads=1),
                        package.manifest.operating_points)
    elbow, hand = dcmread(pydicom_data("RG3_UNCR.dcm")), dcmread(pydicom_data("RG3_UNCR.dcm"))
    elbow.BodyPartExamined, hand.BodyPartExamined = "ELBOW", "HAND"
    got_elbow, got_hand = analyser.analyse([elbow, hand])
    assert got_elbow.grade == Grade.NOT_ANALYSED
    assert got_elbow.reason == "body part not analysed: ELBOW (outside the model's validated scope)"
    assert got_hand.analysed and got_hand.probability is not None


def test_site_aliases_name_the_term_a_spelling_means() -> None:
    """scope.body_part_aliases maps a site's spelling to a defined term: judged as that term,
    in or out of scope; an alias to no defined term is a configuration error."""
    from pydantic import ValidationError

    scope = ScopeConfig(body_part_aliases={"Schulter": "SHOULDER", "ellenbogen": "elbow"})
    ds = _cr()
    with config.disable_value_validation():
        ds.BodyPartExamined = "Schulter"
    assert out_of_scope(ds, scope, PARTS + ["SHOULDER"]) is None
    ds.BodyPartExamined = "ELLENBOGEN"
    assert out_of_scope(ds, scope, PARTS) == ("body part not analysed: ELLENBOGEN "
                                              "(ELBOW: outside the model's validated scope)")
    with pytest.raises(ValidationError, match="not DICOM defined terms of Body Part Examined: SHOLDER"):
        ScopeConfig(body_part_aliases={"SCHULTER": "SHOLDER"})
