"""Per-image classification cost: decode, normalize, infer, Grad-CAM; and ORT vs PyTorch eager.

    python benchmarks/classify.py [--model DIR] [--repeat N] [--threads T]

The per-step table uses ``--model``, else the model shipped with dicomai. For the ORT vs
PyTorch comparison (train extra installed) it builds the shipped architecture with random
weights (speed does not depend on them), exports it with the training pipeline's exporter
(Grad-CAM in the graph) and runs the *same* weights in PyTorch eager. When the shipped map
is stitched (``train stitch``), the stand-in is rewritten the same way and timed in
onnxruntime alone (PyTorch has no counterpart of the rewrite).

Prints two tables: the per-step split (median over --repeat) for RG3 uncompressed, JPEG 2000
lossless and lossy and the JPEG-LS CR, with images/s over the whole sample folder; then
onnxruntime against PyTorch eager on one 224x224 input. Goals (2 cores): normalize + infer +
Grad-CAM of the 1760x1760 uncompressed CR under 60 ms; onnxruntime >= 3x PyTorch eager.
"""

from __future__ import annotations

import argparse
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

from dicomai.imaging.gradcam import gradcam_on_image
from dicomai.imaging.pixels import decode, to_display
from dicomai.model.classifier import Classifier, preprocess
from dicomai.model.package import load_package

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "dicom"


def build_standin(directory: Path, size: int = 224) -> Any:
    """The shipped architecture (from its manifest's training block: backbone, head, output
    stride, or an ensemble's members) with random weights, exported by the training
    pipeline's own exporter; returns the PyTorch wrapper."""
    import torch

    from dicomai.node import default_model_dir
    from dicomai.train.export import export_package
    from dicomai.train.nets import ExportWrapper, from_config

    shipped = default_model_dir()
    training = load_package(shipped).manifest.training if shipped else {}
    torch.manual_seed(0)
    net = from_config({"backbone": "efficientnet_lite0", **training, "size": size}).eval()
    package = export_package(net, directory, f"{training.get('backbone', 'efficientnet_lite0')}-standin", "0",
                             size, {"high_sensitivity": 0.3, "high_specificity": 0.7}, {}, {})
    if "gradcam_map" in training:  # the shipped map is stitched (`train stitch`): the same rewrite
        stitch_standin(package, directory.with_name(directory.name + "-stitched"), training["gradcam_map"])
    return ExportWrapper(net).eval()


def stitch_standin(package: Any, directory: Path, settings: dict[str, Any]) -> None:
    """``package`` rewritten by ``train stitch`` with the shipped map's settings, into ``directory``."""
    from dicomai.train.export import write_manifest
    from dicomai.train.stitch_release import stitch_onnx

    stitch_onnx(package, directory / "model.onnx", [tuple(o) for o in settings["offsets_cells"]],
                settings["factor"], settings["sigma_fine_cells"],
                [tuple(z) for z in settings.get("sizes", [])])
    m = package.manifest
    write_manifest(directory, m.name, m.version, m.input.height, m.operating_points.model_dump(), {}, {},
                   m.weights)


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
    try:
        torch_net = build_standin(tmp / "standin")
    except ImportError:
        print("PyTorch (train extra) not installed: ORT vs eager comparison skipped")
    from dicomai.node import default_model_dir

    model_dir = args.model or default_model_dir() or (tmp / "standin" if torch_net is not None else None)
    if model_dir is None:
        sys.exit("no model: give --model DIR")
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
        return
    import torch

    torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    xt = torch.from_numpy(x)
    with torch.inference_mode():
        ref = torch_net(xt)
        t_torch = median_ms(lambda: torch_net(xt), max(args.repeat, 20))
    sess = Classifier(load_package(tmp / "standin"), threads=args.threads,
                      providers=["CPUExecutionProvider"]).session
    ort_out = sess.run(None, {"input": x})
    t_ort = median_ms(lambda: sess.run(None, {"input": x}), max(args.repeat, 20))
    dp = float(np.abs(ort_out[0] - ref[0].numpy()).max())
    dc = float(np.abs(ort_out[1] - ref[1].numpy()).max())
    print(f"{'shipped network':28} | {'onnxruntime':>11} {'torch eager':>11} | "
          f"{'speed-up':>8} | max |diff| p, cam")
    print(f"{'':28} | {t_ort:9.2f}ms {t_torch:9.2f}ms | {t_torch / t_ort:7.2f}x | {dp:.1e}, {dc:.1e}")
    stitched = tmp / "standin-stitched" / "model.onnx"
    if stitched.exists():  # eager has no counterpart of the rewrite: onnxruntime only
        s2 = Classifier(load_package(stitched.parent), threads=args.threads,
                        providers=["CPUExecutionProvider"]).session
        out2 = s2.run(None, {"input": x})
        t_st = median_ms(lambda: s2.run(None, {"input": x}), max(args.repeat, 20))
        print(f"{'with the shipped map stitch':28} | {t_st:9.2f}ms {'-':>11} | {'-':>8} | "
              f"p {float(np.abs(out2[0] - ort_out[0]).max()):.1e} from the unstitched graph; "
              f"map {out2[1].shape[-2]}x{out2[1].shape[-1]}")


if __name__ == "__main__":
    main()
