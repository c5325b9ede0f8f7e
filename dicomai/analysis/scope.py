"""Which images the model analyses: a pure function of the data set and the configuration.

Everything out of scope is recorded as ``not_analysed`` with the reason returned here.
The node's own results (a PACS may route them back) are never analysed, so there are no
loops.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from dicomai.analysis.bodyparts import KNOWN_BODY_PARTS, body_part_term, defined_term, named_body_parts
from dicomai.config import ScopeConfig

__all__ = ["KNOWN_BODY_PARTS", "OUTSIDE_VALIDATED_SCOPE", "OWN_MANUFACTURER", "OWN_RESULT",
           "body_part_reason", "defined_term", "out_of_scope"]

OWN_MANUFACTURER = "dicomai"
#: The reason given for the node's own objects routed back to it.
OWN_RESULT = "dicomai's own result"
OUTSIDE_VALIDATED_SCOPE = "outside the model's validated scope"

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
    return body_part_reason(ds.get("BodyPartExamined"), scope, model_body_parts)


def body_part_reason(value: object, scope: ScopeConfig, model_body_parts: list[str]) -> str | None:
    """Why an image of this Body Part Examined is not analysed, or ``None`` (the body-part rule
    of :func:`out_of_scope`, also for a labelled PNG or JPEG that names its body part)."""
    part = defined_term(value)
    if not part:
        return None if scope.analyse_empty_body_part else "body part not given"
    aliases = scope.body_part_aliases
    wanted = {body_part_term(b, aliases) for b in (scope.body_parts or model_body_parts)}
    term = body_part_term(value, aliases)
    if not wanted or term in wanted:
        return None
    # The model's list is what it was trained and validated on (the model card's scope).
    why = "not in scope.body_parts" if scope.body_parts else OUTSIDE_VALIDATED_SCOPE
    if term in KNOWN_BODY_PARTS:
        return f"body part not analysed: {part} ({why})" if term == part else (
            f"body part not analysed: {part} ({term}: {why})")
    named = named_body_parts(value)
    if not named:
        if scope.analyse_unknown_body_part:
            return None
        return (f"body part not analysed: {part} (not a recognised value: {why}; see "
                "scope.body_part_aliases and scope.analyse_unknown_body_part)")
    outside = sorted(named - wanted)
    if outside:
        return f"body part not analysed: {part} ({', '.join(outside)}: {why})"
    return None
