"""Which images the model analyses: a pure function of the data set and the configuration.

Everything out of scope is recorded as ``not_analysed`` with the reason returned here.
The node's own results (a PACS may route them back) are never analysed, so there are no
loops.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset

from dicomai.config import ScopeConfig

__all__ = ["KNOWN_BODY_PARTS", "OUTSIDE_VALIDATED_SCOPE", "OWN_MANUFACTURER", "OWN_RESULT", "defined_term",
           "named_body_parts", "out_of_scope"]

OWN_MANUFACTURER = "dicomai"
#: The reason given for the node's own objects routed back to it.
OWN_RESULT = "dicomai's own result"
OUTSIDE_VALIDATED_SCOPE = "outside the model's validated scope"

#: Common defined terms of Body Part Examined (PS3.16 Annex L). A value outside this list is a
#: site's own spelling, judged by the terms among its words (:func:`named_body_parts`); one with
#: none is unknown and analysed only when ``analyse_unknown_body_part`` is set.
KNOWN_BODY_PARTS = frozenset("""
ABDOMEN ANKLE ARM BREAST CALCANEUS CHEST CLAVICLE COCCYX CSPINE CHESTABDOMEN ELBOW EXTREMITY
FACE FEMUR FIBULA FINGER FOOT FOREARM HAND HEAD HEADNECK HEART HIP HUMERUS JAW KNEE LEG
LSPINE MANDIBLE NECK PATELLA PELVIS RIB SACRUM SCAPULA SHOULDER SKULL SPINE STERNUM THUMB
TIBIA TOE TSPINE WRIST LOWEREXTREMITY UPPEREXTREMITY LOWERLEG UPPERLEG ORBIT SINUS SELLA
TMJ ZYGOMA NOSE LUNG HEEL FEET HANDS THORAX WHOLEBODY
""".split())


def named_body_parts(value: object) -> frozenset[str]:
    """The defined terms among the words of a site-specific Body Part Examined (``"HAND RIGHT"``
    -> HAND, ``"CHEST PA"`` -> CHEST, ``"SCHULTER"`` -> none): what such a value is judged by."""
    words = re.split(r"[^A-Z0-9]+", str(value or "").upper())
    return frozenset(w for w in words if w in KNOWN_BODY_PARTS)


def defined_term(value: object) -> str:
    """A coded-string value as the scope rules compare it: upper case, no spaces or underscores
    (``"Lower Leg"``, ``"LOWER_LEG"`` -> ``"LOWERLEG"``)."""
    return str(value or "").strip().upper().replace(" ", "").replace("_", "")


def out_of_scope(ds: Dataset, scope: ScopeConfig, model_body_parts: list[str]) -> str | None:
    """Why this image is not analysed, or ``None`` when it is in scope."""
    if defined_term(ds.get("Manufacturer")) == OWN_MANUFACTURER.upper():
        return OWN_RESULT
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in scope.sop_classes:
        name = getattr(ds.get("SOPClassUID"), "name", sop_class)
        return f"SOP class not analysed: {name}"
    modality = defined_term(ds.get("Modality"))
    if modality not in {m.upper() for m in scope.modalities}:
        return f"modality not analysed: {modality or '(empty)'}"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return f"multi-frame image ({frames} frames)"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    # DERIVED\PRIMARY is an ordinary processed radiograph; SECONDARY is a capture/derivative.
    if "SECONDARY" in image_type[1:2]:
        return "derived/secondary image (" + "\\".join(image_type[:2]) + ")"
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if 0 < min(rows, cols) < scope.min_size_px:  # zero-size is a failure, not a choice
        return f"image too small ({rows}x{cols} < {scope.min_size_px} px)"
    raw = ds.get("BodyPartExamined")
    part = defined_term(raw)
    if not part:
        return None if scope.analyse_empty_body_part else "body part not given"
    wanted = {defined_term(b) for b in (scope.body_parts or model_body_parts)}
    if not wanted or part in wanted:
        return None
    # The model's list is what it was trained and validated on (the model card's scope).
    why = "not in scope.body_parts" if scope.body_parts else OUTSIDE_VALIDATED_SCOPE
    if part in KNOWN_BODY_PARTS:
        return f"body part not analysed: {part} ({why})"
    named = named_body_parts(raw)
    if not named:
        if scope.analyse_unknown_body_part:
            return None
        return (f"body part not analysed: {part} (not a recognised value: {why}; "
                "see scope.analyse_unknown_body_part)")
    outside = sorted(named - wanted)
    if outside:
        return f"body part not analysed: {part} ({', '.join(outside)}: {why})"
    return None
