"""Evaluation of an exported package with the node's own inference code.

Operating points are chosen on ``val`` (high sensitivity: sensitivity >= 0.95; high
specificity: specificity >= 0.95); every figure is then reported on ``test``, with a
bootstrap 95% interval for the AUROC, and the Grad-CAM pointing game on the test fractures'
boxes (map maximum inside a box; share of map energy inside boxes). The validation AUROC
and pointing game are kept too, for choosing between models on validation.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dicomai.imaging.gradcam import gradcam_on_image
from dicomai.imaging.overlay import overlay
from dicomai.imaging.pixels import Letterbox
from dicomai.model.classifier import Classifier, preprocess
from dicomai.model.package import ModelPackage, load_package, sha256_file
from dicomai.train.card import write_model_card
from dicomai.train.data import Sample, load_display
from dicomai.train.metrics import (
    auroc,
    bootstrap_auroc,
    calibration_error,
    confusion,
    pointing_ceiling,
    pointing_game,
    proportion_ci95,
    threshold_for_sensitivity,
    threshold_for_specificity,
)

__all__ = ["evaluate_package", "finish_package", "refresh_package"]


def _run(clf: Classifier, package: ModelPackage, samples: list[Sample]
         ) -> tuple[np.ndarray, list[np.ndarray | None], float, list[Letterbox], tuple[int, int]]:
    probs, cams, geoms = [], [], []
    grid = (0, 0)
    t0 = time.perf_counter()
    for s in samples:
        img = load_display(s.path)
        mi = preprocess(img, package)
        (out,) = clf.predict([mi])
        probs.append(out.probability)
        geoms.append(mi.geometry)
        if out.gradcam is not None:
            grid = (int(out.gradcam.shape[0]), int(out.gradcam.shape[1]))
        cams.append(gradcam_on_image(out.gradcam, mi.geometry)
                    if out.gradcam is not None and s.label == 1 else None)
    return np.array(probs), cams, (time.perf_counter() - t0) / max(len(samples), 1), geoms, grid


def _localisation(samples: list[Sample], cams: list[np.ndarray | None], geoms: list[Letterbox],
                  grid: tuple[int, int]) -> dict[str, Any]:
    """Pointing game (strict, 15 px), its ceiling on this grid and the map energy in the boxes."""
    hits, hits15, energies, ceiling, ceiling15, shares = [], [], [], [], [], []
    for s, cam, geom in zip(samples, cams, geoms, strict=True):
        if cam is not None and s.boxes:
            hit, energy = pointing_game(cam, s.boxes)
            hits.append(hit)
            hits15.append(pointing_game(cam, s.boxes, tolerance=15)[0])
            energies.append(energy)
            ceiling.append(pointing_ceiling(s.boxes, geom, grid))
            ceiling15.append(pointing_ceiling(s.boxes, geom, grid, tolerance=15))
            # image sizes from the inference pass's geometry: no second decode of every image
            shares.append(sum(w * h for _, _, w, h in s.boxes) / (geom.src_h * geom.src_w))

    def mean(values: list[Any]) -> float:
        return float(np.mean(values)) if values else float("nan")

    return {
        "pointing_game": mean(hits), "pointing_game_15px": mean(hits15),
        "pointing_game_ci95": proportion_ci95(sum(hits), len(hits)),
        "pointing_game_15px_ci95": proportion_ci95(sum(hits15), len(hits15)),
        # the best any map on this grid could score (bilinear maxima sit at cell centres)
        "pointing_game_ceiling": mean(ceiling), "pointing_game_ceiling_15px": mean(ceiling15),
        "box_area_share": mean(shares), "energy_in_boxes": mean(energies), "localised_images": len(hits),
    }


def evaluate_package(package: ModelPackage, samples: list[Sample], out_dir: Path,
                     gallery: int = 8) -> dict[str, Any]:
    """All figures of the model card; writes ``evaluation.json`` and PNGs into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clf = Classifier(package, threads=0, providers=["CPUExecutionProvider"])
    val = [s for s in samples if s.split == "val"]
    test = [s for s in samples if s.split == "test"]
    p_val, val_cams, _, val_geoms, grid = _run(clf, package, val)
    p_test, cams, sec, geoms, grid = _run(clf, package, test)
    y_val = np.array([s.label for s in val])
    y_test = np.array([s.label for s in test])
    t_sens = threshold_for_sensitivity(y_val, p_val, 0.95)
    t_spec = max(threshold_for_specificity(y_val, p_val, 0.95), t_sens)
    lo, hi = bootstrap_auroc(y_test, p_test)
    result: dict[str, Any] = {
        # validation localisation too, so that a choice between models can weigh it on validation
        "val": {"images": len(val), "fractured": int(y_val.sum()), "auroc": auroc(y_val, p_val),
                **_localisation(val, val_cams, val_geoms, grid)},
        "test": {
            "images": len(test), "fractured": int(y_test.sum()),
            "auroc": auroc(y_test, p_test), "auroc_ci95": [lo, hi],
            "high_sensitivity": confusion(y_test, p_test, t_sens),
            "high_specificity": confusion(y_test, p_test, t_spec),
            "at_0.5": confusion(y_test, p_test, 0.5),
            "calibration_error": calibration_error(y_test, p_test),
            **_localisation(test, cams, geoms, grid),
        },
        "operating_points": {"high_sensitivity": t_sens, "high_specificity": t_spec},
        "gradcam_grid": list(grid),  # the map as the node gets it ((0, 0): no map)
        "cpu_seconds_per_image": sec,
        "model_sha256": sha256_file(package.onnx_path),  # the file these figures were measured on
    }
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    np.savez(out_dir / "predictions.npz", p_val=p_val, y_val=y_val, p_test=p_test, y_test=y_test)
    _roc_png(y_test, p_test, out_dir / "roc_test.png")
    _confusion_png({"high sensitivity": result["test"]["high_sensitivity"],
                    "high specificity": result["test"]["high_specificity"]}, out_dir / "confusion_test.png")
    _gallery(test, cams, p_test, out_dir / "gradcam_gallery.png", gallery)
    return result


def _roc_png(y: np.ndarray, p: np.ndarray, path: Path, size: int = 360) -> None:
    order = np.argsort(-p)
    tpr = np.concatenate([[0], np.cumsum(y[order] == 1) / max(y.sum(), 1)])
    fpr = np.concatenate([[0], np.cumsum(y[order] == 0) / max((y == 0).sum(), 1)])
    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    m = 30
    d.rectangle([m, m, size - m, size - m], outline="black")
    d.line([m, size - m, size - m, m], fill=(180, 180, 180))
    pts = [(m + f * (size - 2 * m), size - m - t * (size - 2 * m)) for f, t in zip(fpr, tpr, strict=True)]
    d.line(pts, fill=(200, 30, 30), width=2)
    d.text((m, 8), f"ROC (test)  AUROC {auroc(y, p):.3f}", fill="black")
    d.text((size // 2 - 40, size - m + 8), "1 - specificity", fill="black")
    im.save(path)


def _confusion_png(points: dict[str, dict[str, float]], path: Path, cell: int = 90) -> None:
    """One 2x2 confusion matrix (rows truth, columns prediction) per operating point."""
    m = 40
    width = len(points) * (2 * cell + 2 * m) + m
    im = Image.new("RGB", (width, 2 * cell + 3 * m), "white")
    d = ImageDraw.Draw(im)
    for i, (name, c) in enumerate(points.items()):
        x0 = m + i * (2 * cell + 2 * m) + m
        y0 = 2 * m
        d.text((x0, 6), f"{name} (t={c['threshold']:.3f})", fill="black")
        d.text((x0, y0 - 16), "pred. fracture   pred. normal", fill="black")
        d.text((x0 - m + 2, y0 + cell // 2), "fract.", fill="black")
        d.text((x0 - m + 2, y0 + cell + cell // 2), "normal", fill="black")
        cells = [[c["tp"], c["fn"]], [c["fp"], c["tn"]]]
        total = max(sum(sum(r) for r in cells), 1)
        for r in range(2):
            for k in range(2):
                v = int(cells[r][k])
                shade = int(255 - 180 * v / total)
                good = r == k
                fill = (shade, 255, shade) if good else (255, shade, shade)
                box = [x0 + k * cell, y0 + r * cell, x0 + (k + 1) * cell, y0 + (r + 1) * cell]
                d.rectangle(box, fill=fill, outline="black")
                d.text((box[0] + cell // 2 - 10, box[1] + cell // 2 - 6), str(v), fill="black")
        d.text((x0, y0 + 2 * cell + 8), f"sens {c['sensitivity']:.3f}  spec {c['specificity']:.3f}",
               fill="black")
    im.save(path)


def _gallery(test: list[Sample], cams: list[np.ndarray | None], p: np.ndarray, path: Path, n: int) -> None:
    tiles = []
    for s, cam, prob in zip(test, cams, p, strict=True):
        if cam is None or not s.boxes:
            continue
        img = load_display(s.path)
        rgb = Image.fromarray(overlay(img, cam))
        d = ImageDraw.Draw(rgb)
        for x, y, w, h in s.boxes:
            d.rectangle([x, y, x + w, y + h], outline=(0, 255, 0), width=2)
        d.text((4, 4), f"{s.image_id} p={prob:.2f}", fill=(255, 255, 0))
        tiles.append(rgb.resize((256, int(256 * rgb.height / rgb.width))))
        if len(tiles) == n:
            break
    if not tiles:
        return
    height = max(t.height for t in tiles)
    sheet = Image.new("RGB", (256 * len(tiles), height), "black")
    for i, t in enumerate(tiles):
        sheet.paste(t, (256 * i, 0))
    sheet.save(path)


def finish_package(out_dir: Path, manifest: dict[str, Any], training: dict[str, Any], parity: dict[str, Any],
                   samples: list[Sample], val_auroc_in_training: bool = False
                   ) -> tuple[ModelPackage, dict[str, Any]]:
    """A graph already in ``out_dir/model.onnx`` (rewritten or joined) made a package: manifest,
    evaluation (operating points chosen on validation), manifest again with the figures, model card."""
    manifest.update(sha256=sha256_file(out_dir / "model.onnx"), training=training, metrics={"parity": parity})
    (out_dir / "model.json").write_text(json.dumps(manifest, indent=2))  # provisional: evaluate loads it
    evaluation = evaluate_package(load_package(out_dir), samples, out_dir / "evaluation")
    if val_auroc_in_training:
        training["best_val_auroc"] = evaluation["val"]["auroc"]
    manifest.update(operating_points=evaluation["operating_points"], training=training,
                    metrics={"test": evaluation["test"], "val_auroc": evaluation["val"]["auroc"],
                             "val": evaluation["val"], "parity": parity})
    (out_dir / "model.json").write_text(json.dumps(manifest, indent=2))
    result = load_package(out_dir)
    write_model_card(result, evaluation, training, out_dir / "MODEL_CARD.md")
    return result, evaluation


def refresh_package(package: ModelPackage, samples: list[Sample]) -> tuple[ModelPackage, dict[str, Any]]:
    """Evaluate a package again and write the result into it: ``evaluation/``, the operating points
    and figures of ``model.json``, ``MODEL_CARD.md``. The graph is not touched; its training record
    and parity checks are kept. For a package released before the evaluation gained a figure."""
    manifest = json.loads((package.directory / "model.json").read_text())  # as written, every field kept
    metrics = manifest.get("metrics") or {}
    return finish_package(package.directory, manifest, manifest.get("training") or {},
                          metrics.get("parity") or {}, samples)
