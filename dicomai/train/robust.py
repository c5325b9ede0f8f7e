"""Robustness without new data: a package on the test split as it is and on a degraded copy.

Every test image is classified twice with the node's own inference code: as FracAtlas has it,
and after a random mix of the degradations of :mod:`dicomai.train.degrade` (seeded per image,
so the copy is the same on every run and for every package). Both are scored the same way:
AUROC with a bootstrap 95% interval, and sensitivity and specificity (Wilson intervals) at
the package's own two operating points, which is what a site would get without calibrating;
for all images and per region. Per degradation kind, the AUROC on the images that got it,
clean against degraded, shows which kind costs most.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tqdm import tqdm

from dicomai.model.classifier import Classifier, preprocess
from dicomai.model.package import ModelPackage, sha256_file
from dicomai.train.data import Sample, load_display
from dicomai.train.degrade import Degradation, random_mix
from dicomai.train.metrics import auroc, bootstrap_auroc, confusion

__all__ = ["CONDITIONS", "evaluate_robust", "figures", "markdown_table"]

CONDITIONS = ("clean", "degraded")


def figures(y: NDArray[np.int_], p: NDArray[np.float64], points: dict[str, float]) -> dict[str, Any]:
    """AUROC (bootstrap 95% interval) and the confusion at each operating point of ``points``."""
    both = 0 < int(y.sum()) < len(y)
    out: dict[str, Any] = {"images": len(y), "fractured": int(y.sum()),
                           "auroc": auroc(y, p) if both else float("nan"),
                           "auroc_ci95": list(bootstrap_auroc(y, p)) if both and y.sum() >= 2 else None}
    for name, threshold in points.items():
        c = confusion(y, p, threshold)
        out[name] = {k: c[k] for k in ("threshold", "sensitivity", "sensitivity_ci95", "specificity",
                                        "specificity_ci95")}
    return out


def evaluate_robust(package: ModelPackage, samples: list[Sample], seed: int = 0, share: float = 0.5,
                    out_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Figures of ``package`` on the test split, clean and degraded (see the module docstring).

    ``share`` is the probability of each degradation kind in an image's mix (at least one is
    always applied). Writes ``robust.json`` and ``robust_predictions.npz`` into ``out_dir`` when given.
    """
    test = [s for s in samples if s.split == "test"]
    if not test:
        raise ValueError("no test split in the dataset")
    clf = Classifier(package, threads=0, providers=["CPUExecutionProvider"], max_batch=2)
    probs: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    applied: list[tuple[Degradation, ...]] = []
    for i, s in enumerate(tqdm(test, desc="clean + degraded", unit="image", disable=not progress)):
        img = load_display(s.path)
        mixed = random_mix(img, np.random.default_rng([seed, i]), p=share)
        clean, degraded = clf.predict([preprocess(img, package), preprocess(mixed.image, package)])
        probs["clean"].append(clean.probability)
        probs["degraded"].append(degraded.probability)
        applied.append(mixed.applied)
    y = np.array([s.label for s in test])
    p = {c: np.array(v, np.float64) for c, v in probs.items()}
    points = dict(package.manifest.operating_points)
    regions = sorted({s.region for s in test if s.region})
    groups = {"all": np.ones(len(test), bool)} | {r: np.array([s.region == r for s in test]) for r in regions}
    result: dict[str, Any] = {
        "package": f"{package.manifest.name} {package.manifest.version}",
        "model_sha256": sha256_file(package.onnx_path), "seed": seed, "share": share,
        "operating_points": points,
        "conditions": {c: {g: figures(y[m], p[c][m], points) for g, m in groups.items()} for c in CONDITIONS},
        "by_degradation": {},
    }
    for kind in Degradation:
        m = np.array([kind in a for a in applied])
        result["by_degradation"][kind.value] = {
            "images": int(m.sum()), "fractured": int(y[m].sum()),
            **{f"auroc_{c}": auroc(y[m], p[c][m]) if 0 < y[m].sum() < m.sum() else float("nan")
               for c in CONDITIONS}}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "robust.json").write_text(json.dumps(result, indent=2))
        np.savez(out_dir / "robust_predictions.npz", y=y, p_clean=p["clean"], p_degraded=p["degraded"],
                 image_ids=np.array([s.image_id for s in test]),
                 applied=np.array([",".join(k.value for k in a) for a in applied]))
    return result


def _f(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def _ci(ci: Any) -> str:
    return f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else ""


def markdown_table(result: dict[str, Any]) -> str:
    """The figures as Markdown: one row per region and condition, then one per degradation kind."""
    lines = ["| region | images (fractured) | condition | AUROC (95% CI) | high-sens. point: sens / spec "
             "| high-spec. point: sens / spec |", "|---|---|---|---|---|---|"]
    for group in result["conditions"]["clean"]:
        for c in CONDITIONS:
            f = result["conditions"][c][group]
            hs, hp = f["high_sensitivity"], f["high_specificity"]
            lines.append(f"| {group} | {f['images']} ({f['fractured']}) | {c} "
                         f"| {_f(f['auroc'])}{_ci(f['auroc_ci95'])} "
                         f"| {_f(hs['sensitivity'])} / {_f(hs['specificity'])} "
                         f"| {_f(hp['sensitivity'])} / {_f(hp['specificity'])} |")
    lines += ["", "| degradation | images (fractured) | AUROC clean | AUROC degraded |", "|---|---|---|---|"]
    for kind, d in result["by_degradation"].items():
        lines.append(f"| {kind} | {d['images']} ({d['fractured']}) | {_f(d['auroc_clean'])} "
                     f"| {_f(d['auroc_degraded'])} |")
    return "\n".join(lines)
