"""Backbones and heads of the training pipeline: ONNX parity, TFLite weights, resumable runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import FRACATLAS, WEIGHTS, missing, require_train_extra

pytestmark = pytest.mark.train
require_train_extra()

import torch  # noqa: E402


def _radiograph_like(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth uint8 images with a bright bone-like bar at a random place and angle."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:180, 0:140]
    for _ in range(n):
        cx, cy, a = rng.uniform(30, 110), rng.uniform(30, 150), rng.uniform(0, np.pi)
        d = np.abs((xx - cx) * np.sin(a) - (yy - cy) * np.cos(a))
        img = 40 + 150 * np.exp(-(d / 12) ** 2) + rng.normal(0, 6, xx.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _scramble_batchnorms(net: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine terms, so the gradient through them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _assert_export_parity(net: torch.nn.Module, tmp_path: Path, name: str) -> None:
    """Exported to ONNX, the network keeps its probabilities and its Grad-CAM (grad-cam package)."""
    from dicomai.train.export import export_package, parity

    pkg = export_package(net, tmp_path / "pkg", name, "0", 128,
                         {"high_sensitivity": 0.3, "high_specificity": 0.6}, {}, {})
    checks = parity(net, pkg, _radiograph_like(4))
    assert checks["max_abs_prob_diff"] <= 1e-4
    assert checks["gradcam_compared"] >= 2 and checks["gradcam_pearson_min"] >= 0.99


@pytest.mark.parametrize("head", ["linear", "hybrid"])
def test_head_gradient_equals_autograd(head: str) -> None:
    """The analytic d logit / d pooled of the in-graph Grad-CAM equals PyTorch's autograd."""
    from dicomai.train.nets import Head

    torch.manual_seed(0)
    h = Head(40, head)
    _scramble_batchnorms(h, 1)
    h.eval()
    pooled = torch.randn(5, 40, requires_grad=True)
    logit, grad = h.with_gradient(pooled)
    ref = torch.autograd.grad(h(pooled).sum(), pooled)[0]
    assert torch.allclose(logit, h(pooled), atol=1e-6)
    assert torch.allclose(grad, ref, atol=1e-6)
    if head == "hybrid":  # the ReLU masks differ per image: the weights are per image
        assert not torch.allclose(grad[0], grad[1])


@pytest.mark.parametrize("head", ["linear", "hybrid"])
@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "mobilenet_v2", "mobilenet_v3_small",
                                      "resnet50", "densenet121", "vgg16_bn"])
def test_onnx_parity_every_backbone_and_head(backbone: str, head: str, tmp_path: Path) -> None:
    """ONNX probabilities equal PyTorch's; ONNX Grad-CAM matches the grad-cam package's GradCAM."""
    pytest.importorskip("pytorch_grad_cam")
    from dicomai.train.nets import build

    torch.manual_seed(0)
    net = build(backbone, pretrained=False, head=head)
    _scramble_batchnorms(net, 2)
    with torch.no_grad():  # a last layer that likes the features, as a trained one does: a map > 0
        net.head.layers[-1].weight.abs_()
    net.eval()
    _assert_export_parity(net, tmp_path, "parity")


@pytest.mark.parametrize(("backbone", "exact"), [("efficientnet_lite0", True), ("mobilenet_v2", True),
                                                 ("mobilenet_v3_small", False)])
def test_output_stride_16_doubles_the_map_and_keeps_parity(backbone: str, exact: bool,
                                                           tmp_path: Path) -> None:
    """The dilated last stage: a 2x finer Grad-CAM grid, same weights, exported exactly."""
    pytest.importorskip("pytorch_grad_cam")
    from dicomai.train.nets import build

    torch.manual_seed(0)
    coarse = build(backbone, pretrained=False)
    fine = build(backbone, pretrained=False, output_stride=16)
    for bn in coarse.modules():  # batch statistics as running statistics: activations of order 1
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.momentum = 1.0
    with torch.no_grad():
        coarse.train().features(torch.randn(8, 3, 128, 128))
    fine.load_state_dict(coarse.state_dict())  # same parameters, only strides and dilations differ
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        a, b = coarse.eval().features(x), fine.eval().features(x)
    assert b.shape[-2:] == (8, 8) and a.shape[-2:] == (4, 4)
    # Without squeeze-excitation (whose global pooling sees the larger map: MobileNetV3) the
    # atrous conversion is exact on one of the two sub-lattices of the finer grid (which one
    # depends on where the removed stride-2 convolution centred its windows): a padding
    # mistake in the dilated stage would show here.
    assert a.abs().max() > 0.1
    lattice = min(float((a - b[..., o::2, o::2]).abs().max()) for o in (0, 1))
    assert not exact or lattice <= 1e-4 * float(a.abs().max())
    with torch.no_grad():
        fine.head.layers[-1].weight.abs_()
    _assert_export_parity(fine.eval(), tmp_path, "os16")
    with pytest.raises(ValueError, match="output stride 16"):
        build("resnet50", pretrained=False, output_stride=16)


def _ensemble_members() -> list[torch.nn.Module]:
    """Two untrained networks (4x4 and 8x8 grids at 128 px) with activations of order 1."""
    from dicomai.train.nets import build

    torch.manual_seed(0)
    members = [build("mobilenet_v3_small", pretrained=False), build("mobilenet_v2", pretrained=False,
                                                                   output_stride=16)]
    for i, m in enumerate(members):
        for bn in m.modules():  # batch statistics as running statistics: activations of order 1
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = 1.0
        with torch.no_grad():
            m.train().features(torch.randn(8, 3, 128, 128))
            m.head.layers[-1].weight.abs_()
            m.head.layers[-1].bias.fill_(0.1 * (i + 1))
        m.eval()
    return members


def test_ensemble_is_one_network_mean_logit_and_exact_gradcam(tmp_path: Path) -> None:
    """Members on 4x4 and 8x8 grids: mean logit, the Grad-CAM of the concatenated stage, parity."""
    pytest.importorskip("pytorch_grad_cam")
    from dicomai.train.nets import ExportWrapper, build, ensemble

    members = _ensemble_members()
    net = ensemble(members, 128)
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        logits = torch.stack([m(x) for m in members])
        biases = torch.stack([m.head.layers[-1].bias for m in members])
        assert (logits - biases).abs().min() > 0.01  # the features count, not only the biases
        assert torch.allclose(net(x), logits.mean(dim=0), atol=1e-5)
        # Independent reference: each cell's contribution to the mean logit, on the fine grid.
        ref = torch.zeros(3, 8, 8)
        for m in members:
            a = m.features(x)
            r = 8 // a.shape[-1]
            a = a.repeat_interleave(r, dim=2).repeat_interleave(r, dim=3)
            ref += torch.einsum("nkhw,k->nhw", a, m.head.layers[-1].weight[0]) / (64 * len(members))
        probs, cam = ExportWrapper(net)(x)
    assert cam.shape == (3, 8, 8)
    assert torch.allclose(cam, torch.relu(ref), atol=1e-5)
    assert torch.allclose(probs[:, 1], torch.sigmoid(logits.mean(dim=0)), atol=1e-6)
    assert cam.amax() > 0
    _assert_export_parity(net, tmp_path, "ensemble")
    # What cannot be one network is refused with the reason.
    with pytest.raises(ValueError, match="do not nest"):
        ensemble(members, 80)  # 3x3 and 5x5
    with pytest.raises(ValueError, match="linear heads"):
        ensemble([members[0], build("mobilenet_v3_small", pretrained=False, head="hybrid")], 128)


@pytest.mark.parametrize("member", [0, 1])
def test_ensemble_gradcam_from_one_member_is_that_members_map(member: int, tmp_path: Path) -> None:
    """An ensemble explained at one member's stage: the same score, that member's own map, parity."""
    pytest.importorskip("pytorch_grad_cam")
    from dicomai.train.nets import ExportWrapper, ensemble

    members = _ensemble_members()
    everywhere, one = ensemble(members, 128), ensemble(members, 128, gradcam_member=member)
    x = torch.randn(3, 3, 128, 128)
    with torch.no_grad():
        p_all, cam_all = ExportWrapper(everywhere)(x)
        p_one, cam_one = ExportWrapper(one)(x)
        _, own = ExportWrapper(members[member])(x)
    assert torch.equal(p_one, p_all)
    assert cam_one.shape == own.shape == (3, 4 * (member + 1), 4 * (member + 1))  # the member's grid
    assert cam_one.amax() > 0
    assert torch.allclose(cam_one, own / len(members), atol=1e-6, rtol=1e-4)
    r = 8 // own.shape[-1]
    coarse_all = cam_all[:, ::r, ::r]  # the concatenated stage's map on the member's grid
    one_n = cam_one / cam_one.amax(dim=(1, 2), keepdim=True)
    all_n = coarse_all / coarse_all.amax(dim=(1, 2), keepdim=True)
    assert (one_n - all_n).abs().amax() > 0.1  # not that map
    _assert_export_parity(one, tmp_path, "ensemble")
    with pytest.raises(ValueError, match="gradcam_member 2"):
        ensemble(members, 128, gradcam_member=2)


def _imagenet_check_images() -> list[tuple[str, np.ndarray]]:
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    out = []
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        rgb = getattr(data, name)()[..., :3]
        out.append((name, np.asarray(Image.fromarray(rgb).resize((224, 224)))))
    return out


def test_mobilenet_v2_from_tflite_matches_the_reference_interpreter() -> None:
    """The dequantized PyTorch model and TFLite's own interpreter agree on natural images."""
    path = WEIGHTS / "mobilenet_v2_1.0_224_quant.tflite"
    if not path.exists():
        missing(f"TFLite weights at {path}")
    interpreter_mod = pytest.importorskip("ai_edge_litert.interpreter")
    from dicomai.train.tflite_weights import mobilenet_v2_from_tflite

    labels = (WEIGHTS / "imagenet_labels.txt").read_text().splitlines()
    net = mobilenet_v2_from_tflite(path).eval()
    it = interpreter_mod.Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    tops = {}
    for name, img in _imagenet_check_images():
        it.set_tensor(inp["index"], img[None])
        it.invoke()
        scale, zero = out["quantization"]
        p_ref = (it.get_tensor(out["index"])[0].astype(np.float64) - zero) * scale
        x = torch.from_numpy((img.astype(np.float32) - 128) / 128).permute(2, 0, 1)[None]
        with torch.no_grad():
            p = torch.softmax(net(x), 1)[0].numpy()
        assert int(p.argmax()) == int(p_ref.argmax()), name
        assert np.corrcoef(p, p_ref)[0, 1] >= 0.98, name
        tops[name] = labels[int(p.argmax())]
    # ... and classifies sensibly: the cat is a cat, the coffee an espresso.
    assert tops["chelsea"] in {"tabby", "tiger cat", "Egyptian cat"}
    assert tops["coffee"] in {"espresso", "cup", "coffee mug"}


def test_mobilenet_v2_backbone_takes_the_node_normalization_and_calibrates() -> None:
    """Folding ImageNet mean/std into the first convolution and calibrating batch norms keep
    the TFLite function (eval mode); batch statistics (train mode) then change little."""
    path = WEIGHTS / "mobilenet_v2_1.0_224_quant.tflite"
    if not path.exists():
        missing(f"TFLite weights at {path}")
    from dicomai.train.nets import IMAGENET_MEAN, IMAGENET_STD
    from dicomai.train.tflite_weights import (
        calibrate_batchnorm,
        fold_input_normalization,
        mobilenet_v2_from_tflite,
    )

    imgs = np.stack([img for _, img in _imagenet_check_images()]).astype(np.float32) / 255
    x01 = torch.from_numpy(imgs).permute(0, 3, 1, 2)
    net = mobilenet_v2_from_tflite(path).eval()
    with torch.no_grad():
        ref = net(x01 * 2 - 1)
    fold_input_normalization(net, IMAGENET_MEAN, IMAGENET_STD)
    xn = (x01 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        folded = net(xn)
    assert torch.equal(folded.argmax(1), ref.argmax(1))
    assert np.corrcoef(folded.numpy().ravel(), ref.numpy().ravel())[0, 1] > 0.999  # borders pad differently
    calibrate_batchnorm(net.features, xn)
    with torch.no_grad():
        calibrated = net(xn)
        net.features.train()
        batch_stats = net.features(xn).mean(dim=(2, 3))
        net.eval()
        eval_stats = net.features(xn).mean(dim=(2, 3))
    assert torch.allclose(calibrated, folded, atol=1e-3)
    assert np.corrcoef(batch_stats.numpy().ravel(), eval_stats.numpy().ravel())[0, 1] > 0.99


def test_interrupted_fit_resumes_to_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed during its third epoch and resumed ends with the uninterrupted run's history."""
    if not FRACATLAS.exists():
        missing(f"FracAtlas at {FRACATLAS}")
    from dicomai.train import fit as fit_mod
    from dicomai.train.data import load_fracatlas

    samples = load_fracatlas(FRACATLAS)
    small = []
    for split in ("train", "val"):
        for label in (0, 1):
            small += [s for s in samples if s.split == split and s.label == label][:6]
    cfg = fit_mod.FitConfig(backbone="mobilenet_v3_small", head="hybrid", pretrained=False, size=64,
                            batch=6, head_epochs=1, tune_epochs=2, patience=5)
    whole = fit_mod.fit(small, cfg, tmp_path / "whole", log=False)

    real, calls = fit_mod._epoch, {"n": 0}

    def dies_in_third_epoch(*args: object, **kwargs: object) -> float:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(fit_mod, "_epoch", dies_in_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        fit_mod.fit(small, cfg, tmp_path / "cut", log=False)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["epoch"] == 2
    partial = json.loads((tmp_path / "cut" / "history.json").read_text())  # readable mid-run
    assert partial["finished"] is False and len(partial["history"]) == 2
    # A run begun before a setting existed (its last.pt lacks it) resumes with the default.
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    del state["config"]["box_phases"]
    torch.save(state, tmp_path / "cut" / "last.pt")
    monkeypatch.setattr(fit_mod, "_epoch", real)
    resumed = fit_mod.fit(small, cfg, tmp_path / "cut", log=False, resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]  # type: ignore[index,union-attr]
    assert np.allclose([h["loss"] for h in resumed["history"]],  # type: ignore[index,union-attr]
                       [h["loss"] for h in whole["history"]], rtol=1e-5)  # type: ignore[index,union-attr]
    assert resumed["best_val_auroc"] == pytest.approx(whole["best_val_auroc"])
    assert json.loads((tmp_path / "cut" / "history.json").read_text())["best_epoch"] == whole["best_epoch"]
    with pytest.raises(ValueError, match="another configuration"):
        fit_mod.fit(small, fit_mod.FitConfig(**{**cfg.__dict__, "seed": 1}), tmp_path / "cut",
                    log=False, resume=True)


def test_explain_methods_find_an_obvious_lesion(tmp_path: Path) -> None:
    """A model that only responds to one bright spot: Grad-CAM, saliency and LIME all point at
    it, in the original image's coordinates (a letterboxed, non-square image)."""
    pytest.importorskip("lime")
    from PIL import Image

    from dicomai.train.attribution import compare_methods
    from dicomai.train.data import Sample
    from dicomai.train.nets import FractureNet

    img = np.full((150, 260), 60, np.uint8)
    img[100:112, 200:214] = 250  # the "fracture", inside its box
    path = tmp_path / "spot.png"
    Image.fromarray(img).save(path)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 1), torch.nn.ReLU())
    with torch.no_grad():  # only pixels brighter than ~200 (normalized > 1.2 per channel) pass
        features[0].weight.fill_(1.0)
        features[0].bias.fill_(-3 * 1.2)
    net = FractureNet(features, 1, "linear").eval()
    with torch.no_grad():
        net.head.layers[-1].weight.fill_(50.0)
        net.head.layers[-1].bias.fill_(-1.0)
    other = Sample(image_id="plain", path=path, label=0, split="test", region="hand")
    sample = Sample(image_id="spot", path=path, label=1, split="test", region="hand",
                    boxes=[(196.0, 96.0, 22.0, 20.0)])
    result = compare_methods(net, 64, [other, sample], tmp_path / "out", lime_samples=60)
    assert result["images"] == 1
    for method in ("gradcam", "saliency", "lime"):
        assert result["methods"][method]["pointing_game"] == 1.0, method
        # far above chance: the box covers about 1% of the image
        assert result["methods"][method]["energy_in_boxes"] > 10 * result["box_area_share"], method
    assert json.loads((tmp_path / "out" / "explain.json").read_text())["methods"].keys() == {
        "gradcam", "saliency", "lime"}
    assert (tmp_path / "out" / "explain_gallery.png").exists()


def test_float16_storage_keeps_the_arithmetic_and_the_tensors_float16_cannot_hold(tmp_path: Path) -> None:
    """Weights behind Casts: float32 outputs; small and subnormal-heavy tensors stay float32."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from dicomai.train.export import _store_float16

    rng = np.random.default_rng(0)
    ordinary = rng.normal(0, 1, (16, 16)).astype(np.float32)
    tiny = (rng.normal(0, 1, (16, 16)) * 1e-5).astype(np.float32)  # mostly below 2**-14
    bias = (rng.normal(0, 1, (16,)) * 1e-4).astype(np.float32)  # fewer than 64 values; of the product's order
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "ordinary"], ["a"]),
         helper.make_node("MatMul", ["a", "tiny"], ["b"]),
         helper.make_node("Add", ["b", "bias"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(v, n) for n, v in (("ordinary", ordinary), ("tiny", tiny), ("bias", bias))])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    _store_float16(path)
    stored = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert stored == {"ordinary.fp16": TensorProto.FLOAT16, "tiny": TensorProto.FLOAT,
                      "bias": TensorProto.FLOAT}
    x = rng.normal(0, 1, (3, 16)).astype(np.float32)
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert y.dtype == np.float32
    half = ordinary.astype(np.float16).astype(np.float32)
    assert np.allclose(y, x @ half @ tiny + bias, rtol=1e-4, atol=1e-10)
    # a mutation check: had ``tiny`` been rounded (subnormals), the result would be off
    assert not np.allclose(y, x @ half @ tiny.astype(np.float16).astype(np.float32) + bias, rtol=1e-4, atol=0)
