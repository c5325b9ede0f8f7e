"""A released package given the stitched map: rewrite its graph, check it against the original
run on each shifted (and enlarged) copy, evaluate it and write the package
(:mod:`dicomai.train.stitch` builds the graph)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from dicomai.imaging.pixels import resize
from dicomai.model.classifier import preprocess
from dicomai.model.package import ModelPackage
from dicomai.train.data import Sample, load_display
from dicomai.train.evaluate import finish_package
from dicomai.train.stitch import free_spatial, gaussian_weights, interpolation_matrices, stitch_gradcam

__all__ = ["check_stitched", "stitch_onnx", "stitch_package"]


def _shifted(x: np.ndarray, dy: int, dx: int, pad_values: np.ndarray) -> np.ndarray:
    """N x C x H x W batch whose pixel p is ``x``'s p + (dy, dx); uncovered pixels take ``pad_values``."""
    out = np.empty_like(x)
    out[:] = pad_values.reshape(1, -1, 1, 1)
    h, w = x.shape[2:]
    out[:, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
        x[:, :, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
    return out


def check_stitched(original: Path, stitched: Path, tensors: np.ndarray, settings: dict[str, Any],
                   pad_values: np.ndarray) -> dict[str, Any]:
    """The rewritten graph against the original one run on each shifted copy and interpolated here.

    Returns the largest probability difference and the largest map difference (relative to the
    map's peak) over ``tensors`` (N x C x H x W model inputs).
    """
    opts = ort.SessionOptions()
    a = ort.InferenceSession(str(original), opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(stitched), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in a.get_outputs()]
    p_a = a.run(names[:1], {a.get_inputs()[0].name: tensors})[0]
    p_b, cam_b = b.run(names, {b.get_inputs()[0].name: tensors})
    (gh, gw), factor, sigma = settings["source_grid"], settings["factor"], settings["sigma_fine_cells"]
    h, w = tensors.shape[2:]
    shifts = [tuple(s) for s in settings["shifts_px"]]
    ys = interpolation_matrices(gh, h / gh, [s[0] for s in shifts], factor, sigma)
    xs = interpolation_matrices(gw, w / gw, [s[1] for s in shifts], factor, sigma)
    num = np.zeros(cam_b.shape)
    den = np.zeros(cam_b.shape[1:])
    for (dy, dx), gy, gx in zip(shifts, ys, xs, strict=True):
        maps = a.run([names[1]], {a.get_inputs()[0].name: _shifted(tensors, dy, dx, pad_values)})[0]
        num += gy @ maps.astype(np.float64) @ gx.T
        den += gy @ np.ones((gh, gw)) @ gx.T
    ref = num / den
    if settings.get("sizes"):
        # the original graph itself on the enlarged copies (enlarged here by PIL, not by the graph)
        free = ort.InferenceSession(free_spatial(onnx.load(str(original))).SerializeToString(), opts,
                                    providers=["CPUExecutionProvider"])
        dst_y = (np.arange(gh * factor) + 0.5) * (h / gh) / factor
        dst_x = (np.arange(gw * factor) + 0.5) * (w / gw) / factor
        groups = [ref / np.maximum(ref.max(axis=(1, 2), keepdims=True), 1e-12)]
        for sh, sw in settings["sizes"]:
            big = np.stack([[resize(channel, sh, sw) for channel in image] for image in tensors])
            maps = free.run([names[1]], {free.get_inputs()[0].name: big})[0].astype(np.float64)
            sgh, sgw = maps.shape[1:]
            gy = gaussian_weights(dst_y, (np.arange(sgh) + 0.5) * h / sgh, sigma * (h / gh) / factor)
            gx = gaussian_weights(dst_x, (np.arange(sgw) + 0.5) * w / sgw, sigma * (w / gw) / factor)
            fine = (gy @ maps @ gx.T) / (gy @ np.ones((sgh, sgw)) @ gx.T)
            groups.append(fine / np.maximum(fine.max(axis=(1, 2), keepdims=True), 1e-12))
        ref = sum(groups) / len(groups)
    peak = np.maximum(ref.max(axis=(1, 2), keepdims=True), 1e-12)
    return {"images": len(tensors), "max_abs_prob_diff": float(np.abs(p_a - p_b).max()),
            "max_rel_gradcam_diff": float((np.abs(ref - cam_b) / peak).max())}


def stitch_onnx(package: ModelPackage, out_path: Path, offsets: Sequence[tuple[float, float]],
                factor: int, sigma: float, sizes: Sequence[tuple[int, int]] = ()
                ) -> tuple[dict[str, Any], np.ndarray]:
    """Write ``package``'s graph with the stitched map to ``out_path``; return its settings and
    the padding values (per channel, after mean/std) that the shifts fill in."""
    m = package.manifest
    pad = ((m.preprocessing.pad_value - np.asarray(m.preprocessing.mean)) / np.asarray(m.preprocessing.std)
           ).astype(np.float32)
    if not m.outputs.gradcam:
        raise ValueError(f"{package.directory}: the model has no Grad-CAM output")
    shape = (m.input.channels, m.input.height, m.input.width)
    model, settings = stitch_gradcam(onnx.load(str(package.onnx_path)), m.input.name, m.outputs.probabilities,
                                     m.outputs.gradcam, shape, pad.tolist(), offsets, factor, sigma, sizes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out_path))
    return settings, pad


def stitch_package(package: ModelPackage, samples: list[Sample], out_dir: Path, name: str, version: str,
                   offsets: Sequence[tuple[float, float]] = ((0.0, 0.0), (0.5, 0.5)), factor: int = 2,
                   sigma: float = 1.0, check_images: int = 8, sizes: Sequence[tuple[int, int]] = ()
                   ) -> tuple[ModelPackage, dict[str, Any]]:
    """A released package with the finer map: rewrite, check, evaluate, manifest, model card.

    The probabilities are the original graph's; the operating points are chosen again on
    validation (the same, as the scores are) and every figure is re-measured on this package.
    """
    m = package.manifest
    settings, pad = stitch_onnx(package, out_dir / "model.onnx", offsets, factor, sigma, sizes)
    tensors = np.stack([preprocess(load_display(s.path), package).tensor
                        for s in [s for s in samples if s.split == "val"][:check_images]])
    check = check_stitched(package.onnx_path, out_dir / "model.onnx", tensors, settings, pad)
    if check["max_abs_prob_diff"] > 1e-6 or check["max_rel_gradcam_diff"] > 1e-4:
        raise ValueError(f"the rewritten graph does not match the original one: {check}")
    training = {**m.training, "gradcam_map": settings}
    parity = {**m.metrics.get("parity", {}), "stitch": check}
    manifest = m.model_dump(mode="json")
    manifest.update(name=name, version=version)
    result, evaluation = finish_package(out_dir, manifest, training, parity, samples)
    return result, {"evaluation": evaluation, "check": check, "settings": settings}
