"""Dataset layouts of the training pipeline: class folders, MURA, DICOM folder + labels CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from dicomai.imaging.pixels import decode, to_display
from dicomai.train.data import DatasetError, load_dataset, load_display
from tests.helpers import make_study, pydicom_data


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 30), value, np.uint8)).save(path)


def test_class_folders_with_and_without_splits(tmp_path: Path) -> None:
    """train/val/test x fractured/not fractured; without split folders a stable hash split."""
    for split in ("train", "val", "test"):
        _png(tmp_path / "a" / split / "fractured" / "1.png", 200)
        _png(tmp_path / "a" / split / "not fractured" / "2.jpg", 50)
    _png(tmp_path / "a" / "README" / "x.png", 0)  # no class folder: ignored
    samples = load_dataset(tmp_path / "a")
    assert sorted((s.split, s.label) for s in samples) == [
        ("test", 0), ("test", 1), ("train", 0), ("train", 1), ("val", 0), ("val", 1)]
    for n in range(40):
        _png(tmp_path / "b" / "normal" / f"p{n}" / "i.png", 10)
    flat = load_dataset(tmp_path / "b", "folders")
    assert {s.label for s in flat} == {0} and {s.split for s in flat} == {"train", "val", "test"}
    assert [s.split for s in flat] == [s.split for s in load_dataset(tmp_path / "b")]  # stable
    with pytest.raises(DatasetError):
        load_dataset(tmp_path / "a" / "README")


def test_mura_layout_groups_patients(tmp_path: Path) -> None:
    """Study label from the path; MURA valid is test; val is chosen by patient, not image."""
    root = tmp_path / "MURA-v1.1"
    lines = {"train": [], "valid": []}
    for split in lines:
        for p in range(30):
            for study, label in (("study1_positive", 200), ("study2_negative", 30)):
                for i in range(2):
                    rel = f"MURA-v1.1/{split}/XR_WRIST/patient{p:05d}/{study}/image{i}.png"
                    _png(tmp_path / rel, label)
                    lines[split].append(rel)
    for split, rels in lines.items():
        (root / f"{split}_image_paths.csv").write_text("\n".join(rels) + "\n")
    samples = load_dataset(root)
    assert len(samples) == 240 and all(s.path.is_file() for s in samples)
    assert {s.split for s in samples if "/valid/" in s.image_id} == {"test"}
    assert {s.split for s in samples if "/train/" in s.image_id} == {"train", "val"}
    by_patient: dict[str, set[str]] = {}
    for s in samples:
        by_patient.setdefault("/".join(s.image_id.split("/")[1:4]), set()).add(s.split)
    assert all(len(v) == 1 for k, v in by_patient.items())  # a patient never spans two splits
    assert all(s.label == ("positive" in s.image_id) and s.region == "wrist" for s in samples)


def test_dicom_folder_uses_the_node_pixels(tmp_path: Path) -> None:
    """DICOM + labels CSV: the training image is exactly the node's display image."""
    _, files = make_study([pydicom_data("RG3_UNCR.dcm")], tmp_path / "dicom", copies=2,
                          dcmtk_encoding=False)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split,patient_id\n"
                      f"{files[0].name},fractured,train,A\n{files[1].name},0,,B\n")
    samples = load_dataset(tmp_path / "dicom", labels=labels)
    assert [(s.label, s.split) for s in samples][0] == (1, "train")
    assert samples[1].split in ("train", "val", "test")
    ds = dcmread(files[0])
    assert np.array_equal(load_display(samples[0].path), to_display(ds, decode(ds)).image)
    labels.write_text("path,label\nx.dcm,maybe\n")
    with pytest.raises(DatasetError, match="maybe"):
        load_dataset(tmp_path / "dicom", "dicom", labels)
