"""The Key Object Selection document of a positive study, built with highdicom.

It flags the study's positive images "Of Interest" (CID 7010), so that a PACS or viewer that
honours key objects opens them first. "For Referring Provider" would say a person selected
them; the node is the observer here, and the description says it is an AI selection to be
confirmed.
"""

from __future__ import annotations

from highdicom import UID
from highdicom.ko import KeyObjectSelection, KeyObjectSelectionDocument
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicomai import __version__
from dicomai.analysis.scope import OWN_MANUFACTURER
from dicomai.model.package import Manifest
from dicomai.results.identity import apply_identity, identity_of
from dicomai.results.sr import device_observer

__all__ = ["KOS_DESCRIPTION", "KOS_SERIES_NUMBER", "key_objects"]

KOS_SERIES_NUMBER = 9904
KOS_DESCRIPTION = "AI fracture: key images"


def key_objects(images: list[Dataset], manifest: Manifest, series_uid: str, identity: Dataset,
                instance_number: int = 1) -> KeyObjectSelectionDocument:
    """The KOS listing ``images`` (headers, or bare references from the database) as "Of
    Interest"; ``identity`` is a received image of the study whose Patient and Study modules
    the document copies.

    Raises
    ------
    ValueError
        When ``images`` is empty or an image belongs to another study.
    """
    if not images:
        raise ValueError("a key object selection needs at least one image")
    study_uid = str(identity.StudyInstanceUID)
    if any(str(i.StudyInstanceUID) != study_uid for i in images):
        raise ValueError("every key image must belong to the identity's study")
    n = len(images)
    content = KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=images,
        observer_device_context=device_observer(manifest),
        description=(f"{n} image{'s' if n > 1 else ''} with a fracture found by {manifest.name} "
                     f"{manifest.version}; AI result, to be confirmed by a radiologist"))
    # highdicom copies the patient and study from the first evidence item: a clean copy of
    # them, so that a source lacking or breaking a Type 2 attribute still gets its document.
    patient = identity_of(identity)
    evidence = [patient] + [i for i in images if i.SOPInstanceUID != patient.SOPInstanceUID]
    kos = KeyObjectSelectionDocument(
        evidence=evidence, content=content, series_instance_uid=series_uid, series_number=KOS_SERIES_NUMBER,
        sop_instance_uid=UID(), instance_number=instance_number, manufacturer=OWN_MANUFACTURER)
    apply_identity(patient, kos)
    kos.SeriesDescription = KOS_DESCRIPTION
    kos.add_new(0x00181020, "LO", [f"dicomai {__version__}", f"{manifest.name} {manifest.version}"[:64]])
    return kos
