"""Distillation of a released package into one network (dicomai.train.distill)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import FRACATLAS, REPO, missing, require_train_extra

pytestmark = pytest.mark.train
require_train_extra()

from dicomai.train.data import Sample, load_fracatlas  # noqa: E402
from dicomai.train.fit import FitConfig, fit, targets, training_split  # noqa: E402

TEACHER = REPO / "dicomai" / "models" / "default"


def _small() -> list[Sample]:
    """4 normal and 4 fractured FracAtlas images of each split (fractured ones with boxes)."""
    if not FRACATLAS.exists():
        missing(f"FracAtlas at {FRACATLAS}")
    samples = load_fracatlas(FRACATLAS)
    small: list[Sample] = []
    for split in ("train", "val", "test"):
        small += [s for s in samples if s.split == split and s.label == 0][:4]
        small += [s for s in samples if s.split == split and s.label == 1 and s.boxes][:4]
    return small


def test_training_split_leaves_a_region_out() -> None:
    """exclude_region drops the region from training and validation, never from test."""
    samples = [Sample(f"{r}{i}", Path("x.png"), i % 2, split, r) for r in ("hand", "leg")
               for split in ("train", "val", "test") for i in range(3)]
    split = training_split(samples, FitConfig(exclude_region="hand"))
    assert {s.region for s in split["train"] + split["val"]} == {"leg"}
    assert len(split["train"]) == len(split["val"]) == 3
    with pytest.raises(ValueError, match="no training image"):
        training_split([s for s in samples if s.region == "hand"], FitConfig(exclude_region="hand"))


def test_degraded_batches_keep_shape_and_masks() -> None:
    """--degrade: the chosen share of a batch changes, shapes and box masks stay, the store is untouched."""
    from dicomai.train.fit import _degraded

    rng = np.random.default_rng(0)
    images = (rng.random((6, 64, 64)) * 255).astype(np.uint8)
    masks = np.zeros((6, 64, 64), np.uint8)
    masks[:, 20:40, 20:40] = 1
    stored = images.copy()
    idx = np.array([5, 1, 3])
    out, out_masks = _degraded(images, masks, idx, 1.0, np.random.default_rng(1))
    assert out.shape == (3, 64, 64) and out.dtype == np.uint8 and out_masks is not None
    assert all(not np.array_equal(out[k], images[j]) for k, j in enumerate(idx))
    assert out_masks.shape == (3, 64, 64) and all(m.any() for m in out_masks)
    assert np.array_equal(images, stored)
    same, _ = _degraded(images, None, idx, 0.0, np.random.default_rng(1))
    assert np.array_equal(same, images[idx])


def test_soft_targets_mix_label_and_teacher() -> None:
    samples = [Sample("a", Path("a.png"), 1, "train", ""), Sample("b", Path("b.png"), 0, "train", "")]
    soft = targets(samples, FitConfig(teacher_weight=0.25), {"a": 0.6, "b": 0.2})
    assert np.allclose(soft, [0.75 + 0.25 * 0.6, 0.25 * 0.2])
    with pytest.raises(ValueError, match="no teacher probability"):
        targets(samples, FitConfig(teacher_weight=0.25), {"a": 0.6})


def test_fit_refuses_a_teacher_weight_without_the_teacher(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="teacher"):
        fit([], FitConfig(teacher_weight=0.5), tmp_path / "run", log=False)


def test_tiny_distill_releases_and_serves(tmp_path: Path) -> None:
    """Two epochs at 64 px, soft targets, box guidance, degradations: teacher cached, released, served."""
    from dicomai.model.classifier import Classifier, preprocess
    from dicomai.model.package import load_package
    from dicomai.train.data import load_display
    from dicomai.train.distill import TEACHER_CACHE, distill, teacher_probabilities
    from dicomai.train.release import release

    small = _small()
    cfg = FitConfig(backbone="mobilenet_v2", pretrained=False, size=64, batch=4, head_epochs=1, tune_epochs=1,
                    output_stride=16, box_weight=0.5, teacher_weight=0.5, degrade=0.5)
    summary: dict[str, Any] = distill(small, cfg, tmp_path / "run", TEACHER, log=False)
    assert len(summary["history"]) == 2
    assert summary["config"]["teacher_weight"] == 0.5 and summary["config"]["degrade"] == 0.5
    assert summary["config"]["teacher"] == str(TEACHER.resolve())
    cache = json.loads((tmp_path / "run" / TEACHER_CACHE).read_text())
    train_ids = {s.image_id for s in small if s.split == "train"}
    assert set(cache["probabilities"]) == train_ids
    assert all(0 <= p <= 1 for p in cache["probabilities"].values())
    # the cache is used as it stands: a second call runs nothing (a broken package path would fail)
    again = teacher_probabilities(TEACHER, [s for s in small if s.split == "train"],
                                  tmp_path / "run" / TEACHER_CACHE)
    assert again == cache["probabilities"]
    # --resume of a finished run keeps it; another teacher weight is another run
    distill(small, cfg, tmp_path / "run", TEACHER, log=False, resume=True)
    with pytest.raises(ValueError, match="another configuration"):
        distill(small, replace(cfg, teacher_weight=0.3), tmp_path / "run", TEACHER, log=False, resume=True)
    pkg, report = release(tmp_path / "run", small, tmp_path / "pkg", "tiny-distilled", "0.0.1",
                          parity_images=2)
    assert report["parity"]["max_abs_prob_diff"] <= 1e-4
    image = preprocess(load_display(small[-1].path), pkg)
    (out,) = Classifier(load_package(tmp_path / "pkg")).predict([image])
    assert 0 <= out.probability <= 1 and out.gradcam is not None and out.gradcam.shape == (4, 4)
