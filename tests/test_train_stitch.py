"""`train stitch`: a finer Grad-CAM from shifted copies of the input, rewritten into the ONNX graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers import require_train_extra

pytestmark = pytest.mark.train
require_train_extra()

import onnx  # noqa: E402
import torch  # noqa: E402


def _export(net: torch.nn.Module, directory: Path, size: int = 128):  # type: ignore[no-untyped-def]
    from dicomai.train.export import export_package

    return export_package(net, directory, "stitch-test", "0", size,
                          {"high_sensitivity": 0.3, "high_specificity": 0.6}, {}, {})


def _moved(x: np.ndarray, dy: int, dx: int, fill: np.ndarray) -> np.ndarray:
    """Reference shift, written apart from the module's: out[..., i, j] = x[..., i + dy, j + dx]."""
    n, c, h, w = x.shape
    out = np.broadcast_to(fill.reshape(1, c, 1, 1), x.shape).copy()
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, :, i, j] = x[:, :, i + dy, j + dx]
    return out


def _enlarged(x: np.ndarray, size: int) -> np.ndarray:
    """Reference bilinear enlargement (half-pixel centres, edges clamped), written apart from the graph's."""
    def axis(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n - 1), pos - lo

    (y0, y1, fy), (x0, x1, fx) = axis(x.shape[2]), axis(x.shape[3])
    rows = x[:, :, y0] * (1 - fy)[:, None] + x[:, :, y1] * fy[:, None]
    return (rows[..., x0] * (1 - fx) + rows[..., x1] * fx).astype(np.float32)


def _any_size(model: onnx.ModelProto) -> onnx.ModelProto:
    free = onnx.ModelProto()
    free.CopyFrom(model)
    for value in [*free.graph.input, *free.graph.output]:
        for dim in value.type.tensor_type.shape.dim[1:]:
            dim.ClearField("dim_value")
            dim.dim_param = "any"
    return free


def _gaussian_mean(samples: list[tuple[float, float, np.ndarray]], grid: int, cell: float, sigma: float
                   ) -> np.ndarray:
    """Every fine centre the Gaussian-weighted mean of every sample (y, x, value per image)."""
    ref = np.zeros((len(samples[0][2]), grid, grid))
    for k in range(grid):
        for m in range(grid):
            cy, cx = cell * (k + 0.5), cell * (m + 0.5)
            wts = [np.exp(-((cy - y) ** 2 + (cx - xx) ** 2) / (2 * (sigma * cell) ** 2))
                   for y, xx, _ in samples]
            ref[:, k, m] = sum(wt * v for wt, (_, _, v) in zip(wts, samples, strict=True)) / sum(wts)
    return ref


def test_stitched_map_is_the_interpolated_map_of_shifted_copies(tmp_path: Path) -> None:
    """Ensemble explained at its 8x8 member: scores unchanged, a 16x16 map equal to a brute-force
    Gaussian interpolation of the original graph's maps of the shifted copies, and only the
    explained member runs again."""
    import onnxruntime as ort

    from dicomai.train.nets import ensemble
    from dicomai.train.stitch import stitch_gradcam
    from tests.test_train_nets import _ensemble_members

    pkg = _export(ensemble(_ensemble_members(), 128, gradcam_member=1), tmp_path / "pkg")
    fill = np.array([-2.0, -1.5, -1.0], np.float32)
    model = onnx.load(str(pkg.onnx_path))
    offsets, sigma = [(0.0, 0.0), (0.5, 0.5), (-0.25, 0.5)], 1.0
    stitched, settings = stitch_gradcam(model, "input", "probabilities", "gradcam", (3, 128, 128), fill,
                                        offsets, factor=2, sigma=sigma)
    assert settings["source_grid"] == [8, 8] and settings["grid"] == [16, 16]
    assert settings["shifts_px"] == [[0, 0], [8, 8], [-4, 8]]  # 16 px cells
    added = [n for n in stitched.graph.node if n.name.startswith("stitch/")]
    assert 0 < len(added) < 0.75 * len(model.graph.node)  # the member, not the whole ensemble
    onnx.save(stitched, str(tmp_path / "stitched.onnx"))
    a = ort.InferenceSession(str(pkg.onnx_path), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(tmp_path / "stitched.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).normal(size=(2, 3, 128, 128)).astype(np.float32)
    p_a, cam_a = a.run(None, {"input": x})
    p_b, cam_b = b.run(None, {"input": x})
    assert np.array_equal(p_a, p_b)
    assert cam_b.shape == (2, 16, 16) and cam_b.max() > 0
    # Brute force: every fine centre is the Gaussian-weighted mean of every sample of every copy.
    samples = []  # (y, x, value per image)
    for dy, dx in settings["shifts_px"]:
        maps = a.run(["gradcam"], {"input": _moved(x, dy, dx, fill)})[0]
        for i in range(8):
            for j in range(8):
                samples.append((16 * i + 8 + dy, 16 * j + 8 + dx, maps[:, i, j]))
    ref = _gaussian_mean(samples, 16, 8.0, sigma)
    assert np.abs(ref - cam_b).max() <= 1e-5 * ref.max()
    # The copies count: the unshifted map alone, interpolated the same way, is another map.
    base_only, _ = stitch_gradcam(model, "input", "probabilities", "gradcam", (3, 128, 128), fill,
                                  [(0.0, 0.0)], factor=2, sigma=sigma)
    onnx.save(base_only, str(tmp_path / "base.onnx"))
    cam_0 = ort.InferenceSession(str(tmp_path / "base.onnx"), providers=["CPUExecutionProvider"]
                                 ).run(["gradcam"], {"input": x})[0]
    assert np.abs(cam_0 - cam_b).max() > 0.05 * cam_b.max()


def test_enlarged_copies_add_a_finer_scale_to_the_map(tmp_path: Path) -> None:
    """``sizes``: the original graph's own map of the input enlarged to 192 px (12x12 cells), carried
    onto the fine grid, each scale over its peak, averaged with the shifted copies' map; scores unchanged."""
    import onnxruntime as ort

    from dicomai.train.nets import ensemble
    from dicomai.train.stitch import stitch_gradcam
    from tests.test_train_nets import _ensemble_members

    pkg = _export(ensemble(_ensemble_members(), 128, gradcam_member=1), tmp_path / "pkg")
    fill = np.array([-2.0, -1.5, -1.0], np.float32)
    model = onnx.load(str(pkg.onnx_path))
    stitched, settings = stitch_gradcam(model, "input", "probabilities", "gradcam", (3, 128, 128), fill,
                                        [(0.0, 0.0), (0.5, 0.5)], factor=2, sigma=1.0, sizes=[(192, 192)])
    assert settings["sizes"] == [[192, 192]] and settings["size_grids"] == [[12, 12]]
    assert settings["grid"] == [16, 16]
    onnx.save(stitched, str(tmp_path / "stitched.onnx"))
    a = ort.InferenceSession(_any_size(model).SerializeToString(), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(tmp_path / "stitched.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).normal(size=(2, 3, 128, 128)).astype(np.float32)
    p_a = a.run(["probabilities"], {"input": x})[0]
    p_b, cam_b = b.run(None, {"input": x})
    assert np.array_equal(p_a, p_b)
    shifted = []
    for dy, dx in [(0, 0), (8, 8)]:
        maps = a.run(["gradcam"], {"input": _moved(x, dy, dx, fill)})[0]
        shifted += [(16 * i + 8 + dy, 16 * j + 8 + dx, maps[:, i, j]) for i in range(8) for j in range(8)]
    big = a.run(["gradcam"], {"input": _enlarged(x, 192)})[0]
    assert big.shape == (2, 12, 12)
    cell = 128 / 12  # the enlarged copy's cells, in input pixels
    scaled = [(cell * (i + 0.5), cell * (j + 0.5), big[:, i, j]) for i in range(12) for j in range(12)]
    groups = [_gaussian_mean(g, 16, 8.0, 1.0) for g in (shifted, scaled)]
    ref = sum(g / g.max(axis=(1, 2), keepdims=True) for g in groups) / 2
    assert cam_b.shape == (2, 16, 16)
    assert np.abs(ref - cam_b).max() <= 1e-4
    # the enlarged copy counts: without it the map differs
    assert np.abs(groups[0] / groups[0].max(axis=(1, 2), keepdims=True) - cam_b).max() > 0.05


def test_stitch_refuses_what_it_cannot_rewrite(tmp_path: Path) -> None:
    """A hybrid head's Grad-CAM weights depend on the image; two offsets on one pixel are one copy."""
    from dicomai.train.nets import build
    from dicomai.train.stitch import stitch_gradcam

    torch.manual_seed(0)
    hybrid = _export(build("mobilenet_v3_small", pretrained=False, head="hybrid").eval(), tmp_path / "h")
    with pytest.raises(ValueError, match="depend on the image"):
        stitch_gradcam(onnx.load(str(hybrid.onnx_path)), "input", "probabilities", "gradcam", (3, 128, 128),
                       [0.0, 0.0, 0.0])
    linear = _export(build("mobilenet_v3_small", pretrained=False).eval(), tmp_path / "l")
    with pytest.raises(ValueError, match="same pixel shift twice"):
        stitch_gradcam(onnx.load(str(linear.onnx_path)), "input", "probabilities", "gradcam", (3, 128, 128),
                       [0.0, 0.0, 0.0], [(0.0, 0.0), (0.01, 0.0)])
    for sizes in ([(96, 96)], [(128, 128)], [(160, 160), (160, 160)]):
        with pytest.raises(ValueError, match="larger than the input"):
            stitch_gradcam(onnx.load(str(linear.onnx_path)), "input", "probabilities", "gradcam",
                           (3, 128, 128), [0.0, 0.0, 0.0], sizes=sizes)
