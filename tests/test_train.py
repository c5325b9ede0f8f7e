"""A tiny end-to-end training run: fit, export with in-graph Grad-CAM, parity, node inference."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import FRACATLAS, REPO, missing

pytestmark = pytest.mark.train  # conftest.py checks the train extra before each test


def _require_fracatlas() -> None:
    if not FRACATLAS.exists():
        missing(f"FracAtlas at {FRACATLAS}")


def _fracatlas_folder(root: Path, samples: list[Any]) -> Path:
    """A FracAtlas folder of ``samples`` only: its own labels.csv and boxes.csv, the images read in place."""
    root.mkdir()
    for name in ("labels.csv", "boxes.csv"):
        header, *lines = (FRACATLAS / name).read_text().splitlines()
        rows: dict[str, list[str]] = {}
        for line in lines:
            rows.setdefault(line.split(",")[0], []).append(line)
        # in the order of ``samples``: the AUROC bootstrap resamples by position
        kept = [x for s in samples for x in rows.get(s.image_id, [])]
        (root / name).write_text("\n".join([header, *kept]) + "\n")
    (root / "images").symlink_to(FRACATLAS / "images")
    return root


def _small_fracatlas() -> list[Any]:
    """8 normal and 8 fractured FracAtlas images of each split."""
    from dicomai.train.data import load_fracatlas

    samples = load_fracatlas(FRACATLAS)
    small = []
    for split in ("train", "val", "test"):
        for label in (0, 1):
            small += [s for s in samples if s.split == split and s.label == label][:8]
    return small


def test_tiny_fit_release_and_serve(tmp_path: Path) -> None:
    """A few images, one epoch per phase, 64 px: export, parity with PyTorch and grad-cam, classify."""
    _require_fracatlas()
    from dicomai.model.classifier import Classifier, preprocess
    from dicomai.model.package import load_package, sha256_file
    from dicomai.train.data import load_display
    from dicomai.train.fit import FitConfig, fit
    from dicomai.train.release import release

    small = _small_fracatlas()
    cfg = FitConfig(size=64, batch=8, head_epochs=1, tune_epochs=1)
    summary = fit(small, cfg, tmp_path / "run", log=False)
    assert (tmp_path / "run" / "best.pt").exists() and len(summary["history"]) == 2  # type: ignore[arg-type]
    pkg, report = release(tmp_path / "run", small, tmp_path / "pkg", "tiny", "0.0.1", parity_images=4)
    assert report["parity"]["max_abs_prob_diff"] <= 1e-4
    assert report["parity"]["gradcam_compared"] > 0
    assert report["parity"]["gradcam_pearson_min"] >= 0.99
    manifest = json.loads((tmp_path / "pkg" / "model.json").read_text())
    ops = manifest["operating_points"]
    # only FracAtlas's regions are in scope, and the card says so
    from tests.test_scope import VALIDATED
    assert set(manifest["body_parts"]) == VALIDATED
    card = (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    assert "## Validated scope and known limits" in card and "outside the model's validated scope" in card
    # the drift watch's reference, from the validation images
    reference = manifest["reference"]
    assert len(reference["scores"]["edges"]) == len(reference["intensity"]["edges"]) == 9
    val_images = manifest["metrics"]["val"]["images"]
    assert reference["scores"]["images"] == reference["intensity"]["images"] == val_images
    assert 0 <= ops["high_sensitivity"] <= ops["high_specificity"] <= 1
    assert manifest["metrics"]["test"]["images"] == 16
    # The figures were measured on the very file that ships (not on an earlier export of it).
    evaluated = json.loads((tmp_path / "pkg" / "evaluation" / "evaluation.json").read_text())
    assert evaluated["model_sha256"] == manifest["sha256"] == sha256_file(tmp_path / "pkg" / "model.onnx")
    # Localisation on both splits (validation too, to choose on it), never above the grid's ceiling.
    for split in ("val", "test"):
        loc = manifest["metrics"][split]
        boxed = [s for s in small if s.split == split and s.label == 1 and s.boxes]
        assert loc["localised_images"] == len(boxed) > 0
        assert 0 <= loc["pointing_game"] <= loc["pointing_game_ceiling"] <= 1
        assert 0 <= loc["pointing_game_15px"] <= loc["pointing_game_ceiling_15px"] <= 1
    card = (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    assert "FracAtlas" in card and "AUROC" in card
    # Intervals beside the proportions (Wilson) and a verdict per target that reads them.
    test_figures = manifest["metrics"]["test"]
    for point in ("high_sensitivity", "high_specificity"):
        for rate in ("sensitivity", "specificity"):
            lo, hi = test_figures[point][f"{rate}_ci95"]
            assert 0 <= lo <= test_figures[point][rate] <= hi <= 1
    lo, hi = test_figures["pointing_game_ci95"]
    assert 0 <= lo <= test_figures["pointing_game"] <= hi <= 1
    hs = test_figures["high_sensitivity"]
    assert (f"sensitivity {hs['sensitivity']:.3f} (95% CI {hs['sensitivity_ci95'][0]:.3f}-"
            f"{hs['sensitivity_ci95'][1]:.3f})") in card
    assert "## Against the project's targets" in card
    assert card.count("| Grad-CAM pointing game (strict) >= 0.5 |") == 1
    assert (tmp_path / "pkg" / "evaluation" / "roc_test.png").exists()
    _assert_confusion_png(tmp_path / "pkg" / "evaluation" / "confusion_test.png", manifest)
    # The package is served by the node's own inference code ...
    clf = Classifier(load_package(tmp_path / "pkg"))
    img = load_display(small[-1].path)
    (out,) = clf.predict([preprocess(img, pkg)])
    assert 0 <= out.probability <= 1 and out.gradcam is not None
    # Half-precision weight storage: about half the file, the same network within rounding,
    # figures and card of the float16 package.
    half, report16 = release(tmp_path / "run", small, tmp_path / "pkg16", "tiny", "0.0.2", parity_images=4,
                             weights="float16", storage_images=16)
    storage = report16["parity"]["storage"]
    assert storage["images"] == 16 and storage["gradcam_compared"] > 0
    assert storage["onnx_bytes"] < 0.6 * storage["reference_onnx_bytes"]
    assert storage["onnx_bytes"] == half.onnx_path.stat().st_size
    assert storage["max_abs_prob_diff"] <= 1e-2 and storage["gradcam_pearson_min"] >= 0.99
    assert report16["parity"]["max_abs_prob_diff"] <= 1e-4  # the float32 export, as above
    assert load_package(tmp_path / "pkg16").manifest.weights == "float16"
    evaluated16 = json.loads((tmp_path / "pkg16" / "evaluation" / "evaluation.json").read_text())
    assert evaluated16["model_sha256"] == half.manifest.sha256 == sha256_file(half.onnx_path)
    assert "stored as float16" in (tmp_path / "pkg16" / "MODEL_CARD.md").read_text()
    (out16,) = Classifier(half).predict([preprocess(img, half)])
    assert abs(out16.probability - out.probability) <= 1e-2 and out16.gradcam is not None
    # ... and by the offline CLI.
    run = subprocess.run([sys.executable, "-m", "dicomai", "classify", "--model", str(tmp_path / "pkg"),
                          "--json", str(small[-1].path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["model"] == "tiny 0.0.1"
    # The offline comparison of explanation methods runs on the same run folder (and writes
    # into it by default, not into the working directory).
    run = subprocess.run([sys.executable, "-m", "dicomai", "train", "explain", str(tmp_path / "run"),
                          str(FRACATLAS), "--images", "2", "--lime-samples", "30"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "explain").exists()
    explained = json.loads((tmp_path / "run" / "explain" / "explain.json").read_text())
    assert explained["images"] == 2 and set(explained["methods"]) == {"gradcam", "saliency", "lime"}
    assert all(0 <= m["pointing_game"] <= 1 for m in explained["methods"].values())
    assert "lime" in run.stdout
    # A package released before the evaluation had intervals gets them written in by
    # `train evaluate --update-package`; the graph, training record and parity are kept.
    old = tmp_path / "pkg-old"
    shutil.copytree(tmp_path / "pkg", old)
    stale = json.loads((old / "model.json").read_text())
    for split in ("val", "test"):
        for key in [k for k in stale["metrics"][split] if k.endswith("_ci95") and k != "auroc_ci95"]:
            del stale["metrics"][split][key]
    for point in ("high_sensitivity", "high_specificity", "at_0.5"):
        for key in ("sensitivity_ci95", "specificity_ci95"):
            del stale["metrics"]["test"][point][key]
    (old / "model.json").write_text(json.dumps(stale, indent=2))
    (old / "MODEL_CARD.md").write_text("stale card\n")
    shutil.rmtree(old / "evaluation")
    run = subprocess.run([sys.executable, "-m", "dicomai", "train", "evaluate", str(old),
                          str(_fracatlas_folder(tmp_path / "mini", small)), "--update-package"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert not (tmp_path / "evaluation").exists()  # into the package, not --out
    fresh = json.loads((old / "model.json").read_text())
    assert fresh["sha256"] == manifest["sha256"] == sha256_file(old / "model.onnx")
    assert fresh["training"] == manifest["training"]
    assert fresh["metrics"]["parity"] == manifest["metrics"]["parity"]
    assert fresh["operating_points"] == manifest["operating_points"]  # same graph, same data: same choice
    assert fresh["metrics"]["test"] == manifest["metrics"]["test"]
    assert fresh["metrics"]["val"] == manifest["metrics"]["val"]
    assert json.loads((old / "evaluation" / "evaluation.json").read_text())["model_sha256"] == fresh["sha256"]
    assert "## Against the project's targets" in (old / "MODEL_CARD.md").read_text()
    load_package(old)  # still a valid package


def test_ensemble_of_two_runs_releases_and_serves(tmp_path: Path) -> None:
    """Two tiny runs on 2x2 and 4x4 grids -> `train ensemble` -> release with parity -> the node."""
    _require_fracatlas()
    from dicomai.model.classifier import Classifier, preprocess
    from dicomai.model.package import load_package
    from dicomai.train.data import load_display
    from dicomai.train.ensemble import make_ensemble
    from dicomai.train.fit import FitConfig, fit
    from dicomai.train.release import release

    small = _small_fracatlas()
    runs = []
    for stride in (32, 16):
        cfg = FitConfig(backbone="efficientnet_lite0", output_stride=stride, size=64,
                        batch=8, head_epochs=1, tune_epochs=1, seed=stride)
        fit(small, cfg, tmp_path / f"os{stride}", log=False)
        runs.append(tmp_path / f"os{stride}")
    summary = make_ensemble(runs, small, tmp_path / "ens")
    # Members are scored on the same validation pixels as `train fit` scored them.
    for member in summary["members"]:
        assert member["val_auroc"] == pytest.approx(member["best_val_auroc"], abs=1e-9)
    assert 0 <= summary["best_val_auroc"] <= 1 and summary["config"]["output_stride"] == 16
    pkg, report = release(tmp_path / "ens", small, tmp_path / "pkg", "tiny-ensemble", "0.0.1",
                          parity_images=4)
    assert report["parity"]["max_abs_prob_diff"] <= 1e-4
    assert report["parity"]["gradcam_compared"] > 0 and report["parity"]["gradcam_pearson_min"] >= 0.99
    training = pkg.manifest.training
    assert training["backbone"] == "ensemble"
    assert [m["output_stride"] for m in training["members"]] == [32, 16]
    assert pkg.manifest.metrics["val_auroc"] == pytest.approx(summary["best_val_auroc"], abs=1e-4)
    card = (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    assert "Ensemble of 2 networks" in card and "4x4 grid" in card
    clf = Classifier(load_package(tmp_path / "pkg"))
    (out,) = clf.predict([preprocess(load_display(small[-1].path), pkg)])
    assert 0 <= out.probability <= 1 and out.gradcam is not None and out.gradcam.shape == (4, 4)
    # The CLI refuses runs that cannot be one network, with the reason and a non-zero status.
    fit(small, FitConfig(backbone="mobilenet_v3_small", pretrained=False, size=96, batch=8, head_epochs=1,
                         tune_epochs=0), tmp_path / "os32-96", log=False)
    cli = subprocess.run([sys.executable, "-m", "dicomai", "train", "ensemble", str(FRACATLAS),
                          str(tmp_path / "bad"), str(runs[0]), str(tmp_path / "os32-96")],
                         capture_output=True, text=True, timeout=300)
    assert cli.returncode != 0 and "different input sizes" in cli.stderr
    assert not (tmp_path / "bad").exists()
    # Grad-CAM from one member (the coarse one): recorded in the run, exported on that member's
    # grid with parity, served, and named in the model card and by `model info`.
    one = make_ensemble(runs, small, tmp_path / "ens1", gradcam_from=runs[0])
    assert one["config"]["gradcam_member"] == 0 and one["best_val_auroc"] == summary["best_val_auroc"]
    pkg1, report1 = release(tmp_path / "ens1", small, tmp_path / "pkg1", "tiny-ensemble", "0.0.2",
                            parity_images=4)
    assert report1["parity"]["max_abs_prob_diff"] <= 1e-4
    assert report1["parity"]["gradcam_compared"] > 0 and report1["parity"]["gradcam_pearson_min"] >= 0.99
    (out1,) = Classifier(load_package(tmp_path / "pkg1")).predict([preprocess(load_display(small[-1].path),
                                                                                pkg1)])
    assert out1.probability == pytest.approx(out.probability, abs=1e-6)
    assert out1.gradcam is not None and out1.gradcam.shape == (2, 2)
    card1 = (tmp_path / "pkg1" / "MODEL_CARD.md").read_text()
    assert "taken at the last stage of member 1 (efficientnet_lite0)" in card1 and "2x2 grid" in card1
    info = subprocess.run([sys.executable, "-m", "dicomai", "model", "info", str(tmp_path / "pkg1")],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0 and info.stdout.count("Grad-CAM from this member") == 1
    assert re.search(r"epoch [12] of 2\), Grad-CAM from this member; ", info.stdout), info.stdout
    with pytest.raises(ValueError, match="not one of the ensemble's runs"):
        make_ensemble(runs, small, tmp_path / "ens2", gradcam_from=tmp_path / "os32-96")
    # `train stitch`: the same scores, a map twice as fine, checked, evaluated, in the card; served.
    from dicomai.train.stitch_release import stitch_package

    pkg2, report2 = stitch_package(pkg1, small, tmp_path / "pkg2", "tiny-ensemble", "0.0.3")
    assert report2["check"]["max_abs_prob_diff"] <= 1e-6 and report2["check"]["max_rel_gradcam_diff"] <= 1e-4
    assert pkg2.manifest.training["gradcam_map"]["grid"] == [4, 4]
    assert pkg2.manifest.metrics["test"]["auroc"] == pkg1.manifest.metrics["test"]["auroc"]
    assert pkg2.manifest.operating_points == pkg1.manifest.operating_points
    (out2,) = Classifier(load_package(tmp_path / "pkg2")).predict([preprocess(load_display(small[-1].path),
                                                                                pkg2)])
    assert out2.probability == pytest.approx(out1.probability, abs=1e-6)
    assert out2.gradcam is not None and out2.gradcam.shape == (4, 4)
    card2 = (tmp_path / "pkg2" / "MODEL_CARD.md").read_text()
    assert "(16, 16) px" in card2 and "onto a 4x4 grid" in card2 and "(2x2 grid, output" in card2
    bad = subprocess.run([sys.executable, "-m", "dicomai", "train", "stitch", str(tmp_path / "pkg1"),
                          str(FRACATLAS), str(tmp_path / "pkg3"), "--version", "0", "--offsets", "0;0"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "--offsets" in bad.stderr and not (tmp_path / "pkg3").exists()
    # `train combine`: released packages joined without their runs. The two-network ensemble (pkg)
    # and the 4x4 run released alone give a three-network mean logit, whose map is the single run's.
    from dicomai.train.combine import combine_package

    single, _ = release(runs[1], small, tmp_path / "pkg-os16", "tiny-os16", "0.0.4", parity_images=2)
    joined, report4 = combine_package([pkg, single], small, tmp_path / "pkg4", "tiny-joined", "0.0.5",
                                      gradcam_from=1)
    assert report4["check"]["max_abs_prob_diff"] <= 1e-5
    training4 = joined.manifest.training
    assert len(training4["members"]) == 3 and training4["gradcam_member"] == 2
    assert [j["networks"] for j in training4["combined_from"]] == [2, 1]
    image = load_display(small[-1].path)
    outs = [Classifier(p).predict([preprocess(image, p)])[0] for p in (pkg, single, joined)]

    def logit(q: float) -> float:
        return float(np.log(q / (1 - q)))

    expected = 1 / (1 + np.exp(-(2 * logit(outs[0].probability) + logit(outs[1].probability)) / 3))
    assert outs[2].probability == pytest.approx(expected, abs=1e-5)
    assert outs[1].gradcam is not None and outs[2].gradcam is not None
    assert np.array_equal(outs[2].gradcam, outs[1].gradcam)
    assert "joined from the released packages tiny-ensemble 0.0.1 (2 networks), tiny-os16 0.0.4" in (
        tmp_path / "pkg4" / "MODEL_CARD.md").read_text()
    # ...and its map can be stitched like any other
    _, report5 = stitch_package(joined, small, tmp_path / "pkg5", "tiny-joined", "0.0.6")
    assert report5["check"]["max_rel_gradcam_diff"] <= 1e-4
    # The CLI refuses a map over all of an ensemble's members, and a map package not among the packages.
    for source, reason in ((tmp_path / "pkg", "one network or an ensemble explained at one member"),
                           (tmp_path / "pkg2", "not one of the packages")):
        cli = subprocess.run([sys.executable, "-m", "dicomai", "train", "combine", str(FRACATLAS),
                              str(tmp_path / "pkg6"), str(tmp_path / "pkg"), str(tmp_path / "pkg-os16"),
                              "--gradcam-from", str(source), "--version", "0"],
                             capture_output=True, text=True, timeout=300)
        assert cli.returncode != 0 and reason in cli.stderr, cli.stderr


def _assert_confusion_png(path: Path, manifest: dict[str, object]) -> None:
    """Two 2x2 matrices; a cell is greener (correct) or redder (wrong) the more images it holds."""
    from PIL import Image

    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    green = (img[..., 1] == 255) & (img[..., 0] < 255) & (img[..., 2] < 255)
    red = (img[..., 0] == 255) & (img[..., 1] < 255) & (img[..., 2] < 255)
    points = [manifest["metrics"]["test"][k] for k in ("high_sensitivity", "high_specificity")]  # type: ignore[index]
    assert green.any() == any(c["tp"] + c["tn"] for c in points)
    assert red.any() == any(c["fp"] + c["fn"] for c in points)


def test_model_card_names_the_grid_the_map_has(tmp_path: Path) -> None:
    """VGG-16's last stage (before its last pooling) has stride 16, not the configured 32: the
    card's grid, stride and pointing-game ceiling are those of the map the node gets."""
    _require_fracatlas()
    from dicomai.model.classifier import Classifier, preprocess
    from dicomai.train.data import load_display
    from dicomai.train.fit import FitConfig, fit
    from dicomai.train.release import release

    small = _small_fracatlas()
    fit(small, FitConfig(backbone="vgg16_bn", pretrained=False, size=64, batch=8, head_epochs=1,
                         tune_epochs=0), tmp_path / "run", log=False)
    pkg, _ = release(tmp_path / "run", small, tmp_path / "pkg", "tiny-vgg", "0.0.1", parity_images=2)
    (out,) = Classifier(pkg).predict([preprocess(load_display(small[-1].path), pkg)])
    assert out.gradcam is not None and out.gradcam.shape == (4, 4)  # 64 px / 16
    evaluation = json.loads((tmp_path / "pkg" / "evaluation" / "evaluation.json").read_text())
    assert evaluation["gradcam_grid"] == [4, 4]
    card = (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    assert "(4x4 grid, output\nstride 16)" in card and "best possible on a 4x4 grid" in card
    assert "2x2" not in card


def test_validation_images_are_the_node_input_exactly() -> None:
    """Model selection scores the pixels the node feeds the model, not a uint8 rounding of them."""
    _require_fracatlas()
    import torch

    from dicomai.model.classifier import preprocess
    from dicomai.model.package import load_package
    from dicomai.train.data import load_display, load_fracatlas, prepare
    from dicomai.train.fit import _to_input

    pkg = load_package(REPO / "dicomai" / "models" / "default")
    size = pkg.manifest.input.height
    val = [s for s in load_fracatlas(FRACATLAS) if s.split == "val"][:4]
    node = np.stack([preprocess(load_display(s.path), pkg).tensor for s in val])
    exact, _ = prepare(val, size, exact=True)
    rounded, _ = prepare(val, size)
    assert exact.dtype == np.float32 and rounded.dtype == np.uint8
    assert np.abs(_to_input(torch.from_numpy(exact)).numpy() - node).max() <= 1e-6
    # the uint8 cache of the training images is a rounding: close, but not the node's input
    diff = np.abs(_to_input(torch.from_numpy(rounded)).numpy() - node).max()
    assert 0 < diff <= 0.5 / 255 / min(pkg.manifest.preprocessing.std) + 1e-6
