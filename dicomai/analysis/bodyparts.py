"""Body Part Examined as the node reads it: DICOM's defined terms and sites' own spellings.

Pure functions of the value (and a site's aliases): the scope rules, the site profile's
per-body-part thresholds and the calibration all read a value through :func:`body_part_term`,
so "HAND RIGHT" is a hand to each of them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["KNOWN_BODY_PARTS", "body_part_term", "defined_term", "named_body_parts"]

#: Common defined terms of Body Part Examined (PS3.16 Annex L). A value outside this list is a
#: site's own spelling, judged by the terms among its words (:func:`named_body_parts`).
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


def named_body_parts(value: object) -> frozenset[str]:
    """The defined terms among the words of a site-specific Body Part Examined (``"HAND RIGHT"``
    -> HAND, ``"CHEST PA"`` -> CHEST, ``"SCHULTER"`` -> none). Two neighbouring words that make
    a term are that term, not its last word (``"UPPER-LEG R"`` -> UPPERLEG, not LEG)."""
    words = [w for w in re.split(r"[^A-Z0-9]+", str(value or "").upper()) if w]
    named: set[str] = set()
    i = 0
    while i < len(words):
        pair = "".join(words[i:i + 2])
        if i + 1 < len(words) and pair in KNOWN_BODY_PARTS:
            named.add(pair)
            i += 2
            continue
        if words[i] in KNOWN_BODY_PARTS:
            named.add(words[i])
        i += 1
    return frozenset(named)


def body_part_term(value: object, aliases: Mapping[str, str] | None = None) -> str:
    """The term a Body Part Examined is judged and grouped by: the defined term a site's alias
    names (``scope.body_part_aliases``), the value itself when it is a defined term, the one
    defined term its words name (``"HAND RIGHT"`` -> HAND), else the value as compared
    (:func:`defined_term`; empty for an empty value)."""
    term = defined_term(value)
    if not term:
        return ""
    if aliases and term in aliases:
        return aliases[term]
    if term in KNOWN_BODY_PARTS:
        return term
    named = named_body_parts(value)
    return next(iter(named)) if len(named) == 1 else term
