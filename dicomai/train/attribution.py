"""``dicomai train explain``: Grad-CAM, plain gradient saliency and LIME on the same images.

Every method's map is computed over the letterboxed model input, drawn back onto the
original image exactly as the node draws its Grad-CAM, and scored against the fracture
boxes: pointing game (strict and with 15 px tolerance) and share of the map's positive
energy inside the boxes. As in the published comparisons, only fractured test images with
boxes are used.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image, ImageDraw

from dicomai.imaging.gradcam import gradcam_on_image
from dicomai.imaging.overlay import overlay
from dicomai.imaging.pixels import letterbox
from dicomai.train.data import Sample, load_display
from dicomai.train.metrics import pointing_game
from dicomai.train.nets import IMAGENET_MEAN, IMAGENET_STD, ExportWrapper, FractureNet

__all__ = ["METHODS", "compare_methods"]

METHODS = ("gradcam", "saliency", "lime")
Map = NDArray[np.float32]


def _normalize(boxed: torch.Tensor) -> torch.Tensor:
    """N x H x W in [0, 1] -> the node's model input N x 3 x H x W."""
    x = boxed[:, None].repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _gradcam(net: FractureNet, boxed: NDArray[np.float32], lime_samples: int) -> Map:
    with torch.no_grad():
        _, cam = ExportWrapper(net)(_normalize(torch.from_numpy(boxed)[None]))
    out: Map = cam[0].numpy().astype(np.float32)
    return out


def _saliency(net: FractureNet, boxed: NDArray[np.float32], lime_samples: int) -> Map:
    """|d logit / d input|, largest over the three (identical) channels (Simonyan et al., 2014)."""
    x = _normalize(torch.from_numpy(boxed)[None]).requires_grad_(True)
    (grad,) = torch.autograd.grad(net(x).sum(), x)
    out: Map = grad.abs().amax(dim=1)[0].numpy().astype(np.float32)
    return out


def _lime(net: FractureNet, boxed: NDArray[np.float32], lime_samples: int) -> Map:
    """LIME (Ribeiro et al., 2016) over SLIC superpixels: positive weights for "fractured".

    LIME's default quickshift assumes 0-255 colour images; on a grey [0, 1] radiograph it
    makes two or three huge segments, so SLIC on the grey image (about 150 superpixels,
    compactness for [0, 1] intensities) is used instead.
    """
    from lime import lime_image
    from skimage.segmentation import slic

    def segment(image: NDArray[np.float64]) -> NDArray[np.int_]:
        return slic(image[..., 0], n_segments=150, compactness=0.1, channel_axis=None,  # type: ignore[no-any-return]
                    start_label=0)

    def classify(batch: NDArray[np.float64]) -> NDArray[np.float64]:
        grey = torch.from_numpy(batch[..., 0].astype(np.float32))
        out = []
        with torch.no_grad():
            for i in range(0, len(grey), 64):
                p = torch.sigmoid(net(_normalize(grey[i:i + 64]))).numpy().astype(np.float64)
                out.append(np.stack([1 - p, p], axis=1))
        return np.concatenate(out)

    rgb = np.repeat(boxed[..., None].astype(np.float64), 3, axis=2)
    explainer = lime_image.LimeImageExplainer(random_state=0)
    with contextlib.redirect_stderr(io.StringIO()):  # lime draws a progress bar per image
        exp = explainer.explain_instance(rgb, classify, labels=(1,), top_labels=None, hide_color=0,
                                         num_samples=lime_samples, batch_size=64,
                                         segmentation_fn=segment, random_seed=0)
    weights = dict(exp.local_exp[1])
    lut = np.array([max(weights.get(k, 0.0), 0.0) for k in range(int(exp.segments.max()) + 1)])
    out: Map = lut[exp.segments].astype(np.float32)
    return out


_METHOD_FN: dict[str, Callable[[FractureNet, NDArray[np.float32], int], Map]] = {
    "gradcam": _gradcam, "saliency": _saliency, "lime": _lime}


def compare_methods(net: FractureNet, size: int, samples: list[Sample], out_dir: Path,
                    images: int = 30, lime_samples: int = 500, methods: tuple[str, ...] = METHODS,
                    gallery: int = 6) -> dict[str, Any]:
    """Scores per method on the first ``images`` fractured test images with boxes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in samples if s.split == "test" and s.label == 1 and s.boxes][:images]
    if not chosen:
        raise ValueError("no fractured test images with boxes in this dataset")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    scores: dict[str, dict[str, list[float]]] = {m: {"hit": [], "hit15": [], "energy": [], "seconds": []}
                                                 for m in methods}
    tiles: list[Image.Image] = []
    for n, s in enumerate(chosen):
        img = load_display(s.path)
        boxed, geom = letterbox(img, size, size)
        maps = {}
        for m in methods:
            t0 = time.perf_counter()
            grid = _METHOD_FN[m](net, boxed.astype(np.float32), lime_samples)
            full = gradcam_on_image(grid, geom)
            scores[m]["seconds"].append(time.perf_counter() - t0)
            hit, energy = pointing_game(full, s.boxes)
            scores[m]["hit"].append(float(hit))
            scores[m]["hit15"].append(float(pointing_game(full, s.boxes, tolerance=15)[0]))
            scores[m]["energy"].append(energy)
            maps[m] = full
        if n < gallery:
            tiles.append(_row(img, s, maps))
    area = float(np.mean([sum(w * h for _, _, w, h in s.boxes) / load_display(s.path).size for s in chosen]))
    result: dict[str, Any] = {
        "images": len(chosen), "lime_samples": lime_samples, "input_size": size,
        "box_area_share": area,
        "methods": {m: {"pointing_game": float(np.mean(v["hit"])),
                        "pointing_game_15px": float(np.mean(v["hit15"])),
                        "energy_in_boxes": float(np.mean(v["energy"])),
                        "seconds_per_image": float(np.mean(v["seconds"]))} for m, v in scores.items()},
    }
    (out_dir / "explain.json").write_text(json.dumps(result, indent=2))
    if tiles:
        sheet = Image.new("RGB", (max(t.width for t in tiles), sum(t.height for t in tiles)), "black")
        y = 0
        for t in tiles:
            sheet.paste(t, (0, y))
            y += t.height
        sheet.save(out_dir / "explain_gallery.png")
    return result


def _row(img: NDArray[np.float32], s: Sample, maps: dict[str, Map], width: int = 220) -> Image.Image:
    """The radiograph with its boxes, then one overlay per method, each marked at its maximum."""
    panels = []
    base = Image.fromarray(np.round(img * 255).astype(np.uint8)).convert("RGB")
    for name, m in [("image", None), *maps.items()]:
        rgb = base.copy() if m is None else Image.fromarray(overlay(img, m))
        d = ImageDraw.Draw(rgb)
        for x, y, w, h in s.boxes:
            d.rectangle([x, y, x + w, y + h], outline=(0, 255, 0), width=2)
        if m is not None:
            yy, xx = (int(v) for v in np.unravel_index(int(np.argmax(m)), m.shape))
            d.ellipse([xx - 6, yy - 6, xx + 6, yy + 6], outline=(0, 255, 255), width=2)
        d.text((4, 4), name if m is not None else s.image_id, fill=(255, 255, 0))
        panels.append(rgb.resize((width, int(width * rgb.height / rgb.width))))
    row = Image.new("RGB", (width * len(panels), max(p.height for p in panels)), "black")
    for i, p in enumerate(panels):
        row.paste(p, (i * width, 0))
    return row
