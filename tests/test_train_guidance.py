"""Box guidance of the Grad-CAM during training (dicomai.train.guidance)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import require_train_extra

pytestmark = pytest.mark.train
require_train_extra()

import torch  # noqa: E402

from dicomai.imaging.pixels import letterbox  # noqa: E402
from dicomai.train.data import Sample, load_fracatlas  # noqa: E402
from dicomai.train.fit import FitConfig, _augment, fit  # noqa: E402
from dicomai.train.guidance import box_loss, box_masks, cell_targets, guided_forward  # noqa: E402
from dicomai.train.nets import ExportWrapper, FractureNet  # noqa: E402


def test_box_masks_follow_the_letterbox() -> None:
    """A box drawn on a wide image lands where the letterboxed image shows it."""
    img = np.zeros((100, 260), np.float32)
    box = (150.0, 20.0, 40.0, 30.0)
    x, y, w, h = (int(v) for v in box)
    img[y:y + h, x:x + w] = 1.0
    boxed, geom = letterbox(img, 64, 64)
    sample = Sample("a", Path("a.png"), 1, "train", "hand", [box])
    mask = box_masks([sample], [geom], 64)[0].astype(bool)
    bright = boxed > 0.5
    assert bright.sum() > 20
    assert (mask & bright).sum() / (mask | bright).sum() > 0.7


def test_cell_targets_centres_then_touched_cells() -> None:
    masks = torch.zeros(2, 40, 40)
    masks[0, 8:14, 8:14] = 1  # holds the centre (10, 10) of cell (0, 0) of a 2x2 grid
    masks[1, 25:28, 21:24] = 1  # holds no centre: falls back to the cell it touches, (1, 1)
    t = cell_targets(masks, (2, 2))
    assert t[0].tolist() == [[True, False], [False, False]]
    assert t[1].tolist() == [[False, False], [False, True]]


def test_mask_takes_the_images_geometric_augmentation() -> None:
    from torchvision import tv_tensors

    torch.manual_seed(3)
    img = np.zeros((64, 64), np.uint8)
    img[20:30, 35:45] = 200
    mask = (img > 0).astype(np.uint8)
    aug = _augment()
    for _ in range(10):
        a, m = aug(tv_tensors.Image(torch.from_numpy(img)[None]),
                   tv_tensors.Mask(torch.from_numpy(mask)[None]))
        assert set(torch.unique(m).tolist()) <= {0, 1}
        bright, inside = a[0] > 60, m[0] > 0
        assert (bright & inside).sum() / (bright | inside).sum() > 0.8


def test_box_loss_ignores_normals_and_images_without_boxes() -> None:
    cam = torch.randn(3, 4, 4, requires_grad=True)
    targets = torch.zeros(3, 4, 4, dtype=torch.bool)
    targets[0, 1, 1] = targets[1, 2, 2] = True
    positive = torch.tensor([True, False, True])  # image 2 is positive but has no target cell
    loss = box_loss(cam, targets, positive)
    expected = torch.logsumexp(cam[0].flatten(), 0) - cam[0, 1, 1]
    assert torch.allclose(loss, expected)
    loss.backward()
    assert cam.grad is not None and cam.grad[1:].abs().sum() == 0
    assert float(box_loss(cam, targets, torch.tensor([False, False, False])).detach()) == 0.0


def _two_spots(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fractured images show a boxed "fracture" (a bright square split by a dark line) and a
    confounder (a bright bar, larger, unboxed) at random places; normal images show neither.
    Both predict the label equally well."""
    g = np.random.default_rng(seed)
    x = np.full((n, 48, 48), 30.0, np.float32)
    y = np.zeros(n, np.float32)
    masks = np.zeros((n, 48, 48), np.uint8)
    for i in range(n // 2):
        y[i] = 1
        r0, c0 = g.integers(2, 40, size=2)
        r1, c1 = g.integers(2, 42), g.integers(2, 34)
        while abs(r0 - r1) < 12 and abs(c0 - c1) < 16:
            r1, c1 = g.integers(2, 42), g.integers(2, 34)
        x[i, r1:r1 + 4, c1:c1 + 12] = 240
        x[i, r0:r0 + 6, c0:c0 + 6] = 200
        x[i, r0:r0 + 6, c0 + 3] = 30
        masks[i, r0:r0 + 6, c0:c0 + 6] = 1
    x += g.normal(0, 4, x.shape).astype(np.float32)
    return (torch.from_numpy(x / 255.0)[:, None].repeat(1, 3, 1, 1), torch.from_numpy(y),
            torch.from_numpy(masks))


def _small_net(seed: int) -> FractureNet:
    torch.manual_seed(seed)
    features = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())  # 12 x 12 grid
    return FractureNet(features, 16, "linear", dropout=0.0)


def _train(weight: float, seed: int) -> float:
    """Share of fractured held-out images whose exported Grad-CAM peaks in the boxed spot."""
    x, y, masks = _two_spots(64, seed)
    net = _small_net(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    bce = torch.nn.BCEWithLogitsLoss()
    for _ in range(150):
        logit, cam = guided_forward(net, x)
        loss = bce(logit, y) + weight * box_loss(cam, cell_targets(masks, cam.shape[1:]), y > 0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt, mt = _two_spots(40, seed + 100)
    net.eval()
    with torch.no_grad():
        probs, cams = ExportWrapper(net)(xt)
    pos = yt > 0.5
    assert float(probs[pos, 1].mean()) > 0.8 and float(probs[~pos, 1].mean()) < 0.2  # it learned the task
    targets = cell_targets(mt, cams.shape[1:])
    peak = cams.flatten(1).argmax(1)
    return float(targets.flatten(1)[pos].gather(1, peak[pos, None]).float().mean())


def test_box_guidance_moves_the_exported_gradcam_to_the_boxed_fracture() -> None:
    """Fracture and confounder predict the label equally; only the box loss tells which counts."""
    unguided, guided = _train(0.0, seed=1), _train(1.0, seed=1)
    assert guided >= 0.9, (unguided, guided)
    assert guided > unguided + 0.25, (unguided, guided)


def _fracatlas_like(root: Path, n: int = 12) -> None:
    (root / "images").mkdir(parents=True)
    g = np.random.default_rng(0)
    with open(root / "labels.csv", "w", newline="") as fl, open(root / "boxes.csv", "w", newline="") as fb:
        labels, boxes = csv.writer(fl), csv.writer(fb)
        labels.writerow(["image_id", "fractured", "split", "region"])
        boxes.writerow(["image_id", "x", "y", "w", "h"])
        for i in range(n):
            name, fractured = f"img{i}.png", i % 2
            img = g.integers(20, 60, (90, 70)).astype(np.uint8)
            if fractured:
                img[30:40, 20:32] = 230
                boxes.writerow([name, 20, 30, 12, 10])
            Image.fromarray(img).save(root / "images" / name)
            labels.writerow([name, fractured, "train" if i < 8 else "val", "hand"])


def test_fit_with_box_weight(tmp_path: Path) -> None:
    """`fit` with box guidance runs both phases and records the weight; no boxes: a clear error."""
    _fracatlas_like(tmp_path / "ds")
    samples = load_fracatlas(tmp_path / "ds")
    cfg = FitConfig(backbone="mobilenet_v3_small", pretrained=False, size=64, batch=4, head_epochs=1,
                    tune_epochs=1, box_weight=0.5)
    summary = fit(samples, cfg, tmp_path / "run", log=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["config"]["box_weight"] == 0.5 and len(summary["history"]) == 2  # type: ignore[arg-type]
    assert all(np.isfinite(h["loss"]) for h in history["history"])
    bare = [Sample(s.image_id, s.path, s.label, s.split, s.region) for s in samples]
    with pytest.raises(ValueError, match="box"):
        fit(bare, cfg, tmp_path / "run2", log=False)


def test_box_phases_tune_leaves_the_head_phase_unguided(tmp_path: Path) -> None:
    """With box_phases="tune" the head phase is the unguided run's exactly; the tuning phase is not."""
    _fracatlas_like(tmp_path / "ds")
    samples = load_fracatlas(tmp_path / "ds")
    base = dict(backbone="mobilenet_v3_small", pretrained=False, size=64, batch=4, head_epochs=1,
                tune_epochs=1)
    losses = {}
    for name, extra in {"off": {}, "both": {"box_weight": 0.5},
                        "tune": {"box_weight": 0.5, "box_phases": "tune"}}.items():
        summary = fit(samples, FitConfig(**base, **extra), tmp_path / name, log=False)  # type: ignore[arg-type]
        losses[name] = [h["loss"] for h in summary["history"]]  # type: ignore[attr-defined]
    assert losses["tune"][0] == losses["off"][0]
    assert losses["both"][0] != losses["off"][0]
    assert losses["tune"][1] != losses["off"][1]
    with pytest.raises(ValueError, match="box_phases"):
        fit(samples, FitConfig(**base, box_weight=0.5, box_phases="head"), tmp_path / "bad", log=False)  # type: ignore[arg-type]
