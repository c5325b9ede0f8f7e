"""Per-image classification cost: decode, normalize, infer, Grad-CAM; and ORT vs PyTorch eager.

    python benchmarks/classify.py [--model DIR] [--repeat N] [--threads T]

Without ``--model`` (and with PyTorch installed) it builds a stand-in of the shipped
architecture: MobileNetV3-Small features (random weights: speed does not depend on them),
global average pooling and a linear head, exported to ONNX with the Grad-CAM map computed in
the graph, and runs the *same* weights in PyTorch eager for the inference comparison. Without
PyTorch it uses the tiny synthetic test model and skips that comparison.

Prints two tables: the per-step split (median over --repeat) for RG3 uncompressed, JPEG 2000
lossless and lossy and the JPEG-LS CR, with images/s over the whole sample folder; then
onnxruntime against PyTorch eager on one 224x224 input. Goals (2 cores): normalize + infer +
Grad-CAM of the 1760x1760 uncompressed CR under 60 ms; onnxruntime >= 3x PyTorch eager.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicomai.explain import gradcam_on_image
from dicomai.infer import Classifier, preprocess
from dicomai.model import load_package, sha256_file
from dicomai.normalize import decode, to_display

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "dicom"


def build_standin(directory: Path, size: int = 224) -> Any:
    """MobileNetV3-Small + GAP + linear, exported with an in-graph Grad-CAM; returns the torch model."""
    import torch
    from torch import nn
    from torchvision.models import mobilenet_v3_small

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = mobilenet_v3_small(weights=None).features
            self.head = nn.Linear(576, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            a = self.features(x)  # N x 576 x 7 x 7
            logits = self.head(a.mean(dim=(2, 3)))
            # Grad-CAM of the positive logit: d logit / d A_k = w_k / (h*w) everywhere, so
            # the channel weights are the head's row and the map is their weighted sum.
            w = self.head.weight[1] / (a.shape[2] * a.shape[3])
            cam = torch.relu(torch.einsum("nkhw,k->nhw", a, w))
            return torch.softmax(logits, dim=1), cam

    torch.manual_seed(0)
    net = Net().eval()
    directory.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(directory / "model.onnx"),
                      input_names=["input"], output_names=["probabilities", "gradcam"],
                      dynamic_axes={"input": {0: "N"}, "probabilities": {0: "N"}, "gradcam": {0: "N"}},
                      opset_version=17, dynamo=False)
    manifest = {
        "name": "mobilenetv3-small-standin", "version": "0", "sha256": sha256_file(directory / "model.onnx"),
        "input": {"name": "input", "height": size, "width": size, "channels": 3},
        "preprocessing": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "outputs": {"probabilities": "probabilities", "gradcam": "gradcam"},
        "labels": ["normal", "fractured"], "positive_class": "fractured",
        "operating_points": {"high_sensitivity": 0.3, "high_specificity": 0.7},
    }
    (directory / "model.json").write_text(json.dumps(manifest))
    return net


def median_ms(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dicomai-bench-"))
    torch_net = None
    if args.model is None:
        try:
            torch_net = build_standin(tmp / "model")
            model_dir = tmp / "model"
        except ImportError:
            sys.path.insert(0, str(REPO))
            from tests.synthetic import hot_spot_model

            model_dir = hot_spot_model(tmp / "model")
    else:
        model_dir = args.model
    package = load_package(model_dir)
    clf = Classifier(package, threads=args.threads, providers=["CPUExecutionProvider"])
    files = {
        "RG3 uncompressed": Path(str(get_testdata_file("RG3_UNCR.dcm"))),
        "RG3 JPEG 2000 lossless": Path(str(get_testdata_file("RG3_J2KR.dcm"))),
        "RG3 JPEG 2000 lossy": Path(str(get_testdata_file("RG3_J2KI.dcm"))),
        "RG1 JPEG-LS near-lossless": SHARED / "RG1_JLSN.dcm",
    }
    print(f"model: {package.manifest.name} ({package.manifest.input.height}px), "
          f"{args.threads} threads, median of {args.repeat}, {os.cpu_count()} CPUs")
    print(f"{'image':28} {'size':>10} | {'decode':>7} {'normalize':>9} {'infer':>7} {'gradcam':>8} | "
          f"{'norm+inf+cam':>12} ms")
    for label, path in files.items():
        ds = dcmread(path)
        stored = decode(ds)
        shown = to_display(ds, stored)
        mi = preprocess(shown.image, package)
        (out,) = clf.predict([mi])
        t_dec = median_ms(lambda ds=ds: decode(ds), args.repeat)
        t_norm = median_ms(lambda ds=ds, s=stored: preprocess(to_display(ds, s).image, package), args.repeat)
        t_inf = median_ms(lambda mi=mi: clf.predict([mi]), args.repeat)
        t_cam = (median_ms(lambda o=out, mi=mi: gradcam_on_image(o.gradcam, mi.geometry), args.repeat)
                 if out.gradcam is not None else float("nan"))
        size = f"{ds.Rows}x{ds.Columns}"
        print(f"{label:28} {size:>10} | {t_dec:7.1f} {t_norm:9.1f} {t_inf:7.1f} {t_cam:8.1f} | "
              f"{t_norm + t_inf + t_cam:12.1f}")
    extra = ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG3_J2KR.dcm", "RG3_J2KI.dcm")
    folder = sorted(SHARED.glob("*.dcm")) + [Path(str(get_testdata_file(n))) for n in extra]
    t0 = time.perf_counter()
    for path in folder:
        ds = dcmread(path)
        mi = preprocess(to_display(ds).image, package)
        (out,) = clf.predict([mi])
        if out.gradcam is not None:
            gradcam_on_image(out.gradcam, mi.geometry)
    elapsed = time.perf_counter() - t0
    print(f"folder of {len(folder)} real radiographs (read+decode+normalize+infer+Grad-CAM): "
          f"{len(folder) / elapsed:.1f} images/s")
    if torch_net is None:
        print("PyTorch not installed (or --model given): ORT vs eager comparison skipped")
        return
    import torch

    torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        ref = torch_net(xt)
        t_torch = median_ms(lambda: torch_net(xt), max(args.repeat, 20))
    sess = clf.session
    ort_out = sess.run(None, {"input": x})
    t_ort = median_ms(lambda: sess.run(None, {"input": x}), max(args.repeat, 20))
    dp = float(np.abs(ort_out[0] - ref[0].numpy()).max())
    dc = float(np.abs(ort_out[1] - ref[1].numpy()).max())
    print(f"{'inference, 1x3x224x224':28} | {'onnxruntime':>11} {'torch eager':>11} | "
          f"{'speed-up':>8} | max |diff| p, cam")
    print(f"{'':28} | {t_ort:9.2f}ms {t_torch:9.2f}ms | {t_torch / t_ort:7.2f}x | {dp:.1e}, {dc:.1e}")


if __name__ == "__main__":
    main()
