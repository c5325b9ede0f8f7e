"""The model shipped inside the package: valid, and its model card's figures reproduce."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicomai.node import default_model_dir
from tests.helpers import REPO, missing

FRACATLAS = REPO.parent / "shared" / "data" / "fracatlas"


def _shipped() -> Path:
    path = default_model_dir()
    if path is None:
        pytest.fail("no model shipped in dicomai/models/default")
    return path


def test_shipped_model_verifies() -> None:
    """`dicomai model verify` accepts the shipped package (hash, manifest, graph)."""
    run = subprocess.run([sys.executable, "-m", "dicomai", "model", "verify", str(_shipped())],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    card = (_shipped() / "MODEL_CARD.md").read_text()
    assert "FracAtlas" in card and "doi:10.1038/s41597-023-02432-4" in card
    # `model info` gives an admin one short line per member of an ensemble
    info = subprocess.run([sys.executable, "-m", "dicomai", "model", "info", str(_shipped())],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    manifest = json.loads((_shipped() / "model.json").read_text())
    for member in manifest["training"].get("members", []):
        assert f"{member['backbone']} (val AUROC {member['best_val_auroc']:.3f}, epoch" in info.stdout


@pytest.mark.integration
def test_classify_reproduces_model_card_auroc(tmp_path: Path) -> None:
    """`dicomai classify` on FracAtlas test gives the model card's AUROC to two decimals."""
    if not FRACATLAS.exists():
        missing(f"FracAtlas at {FRACATLAS}")
    from dicomai.train.data import load_fracatlas
    from dicomai.train.metrics import auroc

    manifest = json.loads((_shipped() / "model.json").read_text())
    test = [s for s in load_fracatlas(FRACATLAS) if s.split == "test"]
    run = subprocess.run([sys.executable, "-m", "dicomai", "classify", "--json",
                          *[str(s.path) for s in test]], capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-2000:]
    probs = {json.loads(line)["path"]: json.loads(line)["probability"] for line in run.stdout.splitlines()}
    y = np.array([s.label for s in test])
    p = np.array([probs[str(s.path)] for s in test])
    assert round(auroc(y, p), 2) == round(manifest["metrics"]["test"]["auroc"], 2)
