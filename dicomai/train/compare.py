"""``dicomai train compare``: released model packages side by side, as a Markdown table.

Figures come from each package's ``model.json`` (written by ``train release``: test split,
operating points chosen on validation); parameters are counted in the ONNX graph and the
latency is measured here, with the node's own inference code, on one letterboxed input.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from dicomai.model.classifier import Classifier, preprocess
from dicomai.model.package import load_package

__all__ = ["compare_packages", "markdown_table"]


def _parameters(onnx_path: Path) -> int:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    return int(sum(numpy_helper.to_array(t).size for t in model.graph.initializer))


def _latency_ms(directory: Path, threads: int, repeats: int) -> float:
    package = load_package(directory)
    clf = Classifier(package, threads=threads, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    mi = preprocess(rng.random((512, 400), dtype=np.float32), package)
    clf.predict([mi])  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        clf.predict([mi])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000)


def compare_packages(directories: list[Path], threads: int = 1, repeats: int = 20) -> list[dict[str, Any]]:
    rows = []
    for d in directories:
        m = load_package(d).manifest
        t = (m.metrics or {}).get("test", {})
        training = m.training or {}
        hs, hp = t.get("high_sensitivity", {}), t.get("high_specificity", {})
        members = training.get("members", [])
        backbone = training.get("backbone", "?")
        if members:  # `train ensemble`: name the members, count their epochs
            backbone = "ensemble of " + " + ".join(str(x.get("backbone", "?")) for x in members)
        rows.append({
            "package": f"{m.name} {m.version}", "backbone": backbone,
            "head": training.get("head", "linear"), "pretrained": training.get("pretrained", True),
            "input": m.input.height, "output_stride": int(training.get("output_stride", 32)),
            "box_weight": float(training.get("box_weight", 0.0)),
            "auroc": t.get("auroc"), "auroc_ci95": t.get("auroc_ci95"),
            "hs_sens": hs.get("sensitivity"), "hs_spec": hs.get("specificity"),
            "hs_sens_ci95": hs.get("sensitivity_ci95"),  # absent in packages evaluated before the intervals
            "hp_sens": hp.get("sensitivity"), "hp_spec": hp.get("specificity"),
            "hp_spec_ci95": hp.get("specificity_ci95"),
            "pointing_game": t.get("pointing_game"), "pointing_game_15px": t.get("pointing_game_15px"),
            "pointing_game_ci95": t.get("pointing_game_ci95"),
            "val_auroc": (m.metrics or {}).get("val_auroc"),
            "params_m": _parameters(d / "model.onnx") / 1e6,
            "onnx_mb": (d / "model.onnx").stat().st_size / 1e6,
            "latency_ms": _latency_ms(d, threads, repeats),
            "train_minutes": float(training.get("seconds", 0)) / 60,
            "epochs": (" + ".join(str(x.get("epochs")) for x in members) if members
                       else training.get("epochs")),
        })
    return rows


def _f(v: Any, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _ci(ci: Any) -> str:
    """`` [lo-hi]`` (a 95% interval) after a figure that has one."""
    return f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci else ""


def markdown_table(rows: list[dict[str, Any]], threads: int = 1) -> str:
    head = ("| model | backbone, head | val AUROC | test AUROC (95% CI) "
            "| high-sens. point: sens [95% CI] / spec | high-spec. point: sens / spec [95% CI] "
            "| pointing game [95% CI] (15 px) | params | ONNX | "
            f"CPU ms ({threads} thread) | training |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        ci = r["auroc_ci95"] or [None, None]
        origin = "ImageNet" if r["pretrained"] else "scratch"
        extra = "".join([f", output stride {r['output_stride']}" if r["output_stride"] != 32 else "",
                         f", box guidance {r['box_weight']:g}" if r["box_weight"] > 0 else ""])
        lines.append(
            f"| {r['package']} | {r['backbone']} ({origin}), {r['head']}, {r['input']} px{extra} "
            f"| {_f(r['val_auroc'])} | {_f(r['auroc'])} ({_f(ci[0])}-{_f(ci[1])}) "
            f"| {_f(r['hs_sens'])}{_ci(r['hs_sens_ci95'])} / {_f(r['hs_spec'])} "
            f"| {_f(r['hp_sens'])} / {_f(r['hp_spec'])}{_ci(r['hp_spec_ci95'])} "
            f"| {_f(r['pointing_game'])}{_ci(r['pointing_game_ci95'])} ({_f(r['pointing_game_15px'])}) "
            f"| {r['params_m']:.2f} M "
            f"| {r['onnx_mb']:.1f} MB | {r['latency_ms']:.1f} "
            f"| {r['epochs']} epochs, {r['train_minutes']:.0f} min |")
    return "\n".join(lines)
