"""The patient and study a result object belongs to, copied whole from a received image.

Every result object carries the source's Patient, General Study, Patient Study and clinical
trial modules and its Specific Character Set, so that an archive files it with its study
(patient ID *and* issuer, accession number *and* issuer) and dcentvfy finds nothing that
differs between the originals and the results. Real sources lack or break attributes: an
attribute that is absent or cannot be decoded is left out, and the Type 2 attributes the
result IODs require are then present and empty. Nothing here raises on a bad header.
"""

from __future__ import annotations

import copy
import functools

from highdicom._standard_utils import get_module_attribute_map
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

from dicomai.analysis.scope import KNOWN_BODY_PARTS, defined_term

__all__ = ["IDENTITY_MODULES", "apply_identity", "apply_series_context", "identity_of", "laterality_of",
           "values_of"]

#: The modules of the Patient and Study information entities of every image IOD.
IDENTITY_MODULES = ("patient", "clinical-trial-subject", "general-study", "patient-study",
                    "clinical-trial-study")
#: Type 2 in the Patient and General Study modules: present, empty when unknown.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: Value representations whose text a constructor parses (highdicom turns DA into a date).
_CHECKED = frozenset({"AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
#: What a result object needs to reference the image it was made from.
_REFERENCE = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


@functools.cache
def _keywords() -> tuple[str, ...]:
    table = get_module_attribute_map()
    found: dict[str, None] = {"SpecificCharacterSet": None}
    for module in IDENTITY_MODULES:
        for item in table[module]:
            if not item["path"]:
                found[str(item["keyword"])] = None
    return tuple(found)


def _items(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _copied(source: Dataset, keyword: str) -> Dataset | None:
    """A one-attribute data set holding a decoded copy of the attribute, or None."""
    tag = tag_for_keyword(keyword)
    if tag is None or tag not in source:
        return None
    try:
        elem = copy.deepcopy(source[tag])  # decodes the value, sequence items included
        if elem.VR in _CHECKED:
            for value in _items(elem.value):
                validate_value(elem.VR, str(value), config.RAISE)
    except Exception:  # noqa: BLE001 -- a value that cannot be read is treated as absent
        return None
    out = Dataset()
    out.add(elem)
    return out


def identity_of(source: Dataset) -> Dataset:
    """The source's patient and study attributes and the UIDs that reference it, as a new data
    set that highdicom's constructors (SR evidence, SC reference data set) accept.

    The source may be a full image header or a bare reference; attributes it lacks or whose
    value cannot be decoded are left out, except the Type 2 ones, which are then empty.
    """
    ds = Dataset()
    for keyword in _REFERENCE:
        if keyword in source:
            setattr(ds, keyword, source[keyword].value)
    for keyword in _keywords():
        one = _copied(source, keyword)
        if one is not None:
            ds.update(one)
    for keyword in _TYPE2:
        if keyword not in ds:
            ds.add_new(keyword, dictionary_VR(keyword), None)
    return ds


def apply_identity(identity: Dataset, target: Dataset) -> None:
    """Give ``target`` exactly the patient and study attributes of ``identity`` (from
    :func:`identity_of`), replacing what a constructor set from a subset of them."""
    for keyword in _keywords():
        if keyword in identity:
            target[keyword] = copy.deepcopy(identity[keyword])
        elif keyword in target and keyword not in _TYPE2:
            del target[keyword]


def values_of(source: Dataset, keyword: str) -> list[str]:
    """The attribute's values as text; none when it is absent, empty or cannot be decoded."""
    one = _copied(source, keyword)
    if one is None:
        return []
    return [str(v) for v in _items(one[keyword].value)]


#: Body parts without a left and a right: a result of one has no Laterality (Type 2C,
#: required for paired parts only) unless its source gives one.
_UNPAIRED = frozenset({"ABDOMEN", "CHEST", "CHESTABDOMEN", "COCCYX", "CSPINE", "HEAD", "HEADNECK",
                       "HEART", "LSPINE", "NECK", "PELVIS", "SACRUM", "SKULL", "SPINE", "SSPINE", "TSPINE",
                       "WHOLEBODY"})


def apply_series_context(source: Dataset, target: Dataset) -> None:
    """The series a result starts: the source's Body Part Examined (what the image shows;
    a defined term only, a site's own spelling is left out), no empty Laterality for an
    unpaired part, and the result's own creation date and time as Series Date and Time."""
    part = defined_term(source.get("BodyPartExamined"))
    if part in KNOWN_BODY_PARTS:
        target.BodyPartExamined = part
    if part in _UNPAIRED and "Laterality" in target and not target.Laterality:
        del target.Laterality
    if "InstanceCreationDate" in target:
        target.SeriesDate = target.InstanceCreationDate
    if "InstanceCreationTime" in target:
        target.SeriesTime = target.InstanceCreationTime


def laterality_of(source: Dataset) -> str:
    """The source's laterality (of the series or the image), empty when unknown."""
    return (values_of(source, "Laterality") or values_of(source, "ImageLaterality") or [""])[0]
