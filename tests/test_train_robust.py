"""A package on the test split, clean and degraded (dicomai.train.robust)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import FRACATLAS, REPO, missing, require_train_extra

pytestmark = pytest.mark.train
require_train_extra()

from dicomai.model.package import load_package  # noqa: E402
from dicomai.train.data import Sample, load_fracatlas  # noqa: E402
from dicomai.train.degrade import Degradation  # noqa: E402
from dicomai.train.robust import evaluate_robust, figures, markdown_table  # noqa: E402


def test_figures_at_the_operating_points() -> None:
    """AUROC with an interval; sensitivity and specificity at each named threshold."""
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    f = figures(y, p, {"high_sensitivity": 0.3, "high_specificity": 0.65})
    assert f["images"] == 6 and f["fractured"] == 3 and f["auroc"] == pytest.approx(8 / 9)
    hs, hp = f["high_sensitivity"], f["high_specificity"]
    assert hs["sensitivity"] == 1.0 and hs["specificity"] == pytest.approx(2 / 3)
    assert hp["sensitivity"] == pytest.approx(2 / 3) and hp["specificity"] == 1.0
    one_class = figures(np.zeros(3, int), p[:3], {"high_sensitivity": 0.3})
    assert np.isnan(one_class["auroc"]) and one_class["auroc_ci95"] is None


def test_shipped_package_clean_and_degraded(tmp_path: Path) -> None:
    """Same seed, same degraded copy; per region and per degradation kind; written to disk."""
    if not FRACATLAS.exists():
        missing(f"FracAtlas at {FRACATLAS}")
    samples = load_fracatlas(FRACATLAS)
    small: list[Sample] = []
    for region in ("hand", "leg"):
        for label in (0, 1):
            small += [s for s in samples if s.split == "test" and s.region == region and s.label == label][:2]
    package = load_package(REPO / "dicomai" / "models" / "default")
    a = evaluate_robust(package, small, seed=3, out_dir=tmp_path, progress=False)
    b = evaluate_robust(package, small, seed=3, progress=False)
    assert a["conditions"] == b["conditions"]
    assert set(a["conditions"]["clean"]) == {"all", "hand", "leg"}
    assert a["conditions"]["degraded"]["hand"]["images"] == 4
    assert a["operating_points"] == dict(package.manifest.operating_points)
    assert set(a["by_degradation"]) == {k.value for k in Degradation}
    assert sum(d["images"] for d in a["by_degradation"].values()) >= len(small)  # at least one kind each
    saved = np.load(tmp_path / "robust_predictions.npz")
    assert len(saved["p_degraded"]) == 8 and not np.array_equal(saved["p_clean"], saved["p_degraded"])
    assert (tmp_path / "robust.json").exists()
    table = markdown_table(a)
    assert "| hand | 4 (2) | degraded |" in table and "| jpeg |" in table
