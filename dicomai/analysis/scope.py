"""Which images the model analyses: a pure function of the data set and the configuration.

Everything out of scope is recorded as ``not_analysed`` with the reason returned here.
The node's own results (a PACS may route them back) are never analysed, so there are no
loops.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomai.config import ScopeConfig

__all__ = ["KNOWN_BODY_PARTS", "OUTSIDE_VALIDATED_SCOPE", "OWN_MANUFACTURER", "OWN_RESULT", "defined_term",
           "out_of_scope"]

OWN_MANUFACTURER = "dicomai"
#: The reason given for the node's own objects routed back to it.
OWN_RESULT = "dicomai's own result"
OUTSIDE_VALIDATED_SCOPE = "outside the model's validated scope"

#: Common defined terms of Body Part Examined (PS3.16 Annex L). A value outside this list is
#: "unknown" (site-specific spelling) and analysed when ``analyse_unknown_body_part`` is set.
KNOWN_BODY_PARTS = frozenset("""
ABDOMEN ANKLE ARM BREAST CALCANEUS CHEST CLAVICLE COCCYX CSPINE CHESTABDOMEN ELBOW EXTREMITY
FACE FEMUR FIBULA FINGER FOOT FOREARM HAND HEAD HEADNECK HEART HIP HUMERUS JAW KNEE LEG
LSPINE MANDIBLE NECK PATELLA PELVIS RIB SACRUM SCAPULA SHOULDER SKULL SPINE STERNUM THUMB
TIBIA TOE TSPINE WRIST LOWEREXTREMITY UPPEREXTREMITY LOWERLEG UPPERLEG ORBIT SINUS SELLA
TMJ ZYGOMA NOSE LUNG HEEL FEET HANDS THORAX WHOLEBODY
""".split())


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
    wanted = {defined_term(b) for b in (scope.body_parts or model_body_parts)}
    part = defined_term(ds.get("BodyPartExamined"))
    known_or_strict = part in KNOWN_BODY_PARTS or not scope.analyse_unknown_body_part
    if wanted and part and part not in wanted and known_or_strict:
        # The model's list is what it was trained and validated on (the model card's scope).
        why = "not in scope.body_parts" if scope.body_parts else OUTSIDE_VALIDATED_SCOPE
        return f"body part not analysed: {part} ({why})"
    if not part and not scope.analyse_unknown_body_part:
        return "body part not given"
    return None
