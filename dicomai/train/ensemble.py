"""``dicomai train ensemble``: several ``train fit`` runs as one network and one ONNX graph.

The ensemble's logit is the mean of its members' logits (see :func:`dicomai.train.nets.ensemble`),
so it is released, served and explained like any single network: ``train release`` exports it
with its exact in-graph Grad-CAM and checks parity as usual. The members and the ensemble are
scored on the validation split, on the node's own pixels, so that an ensemble is chosen on
validation like any other model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomai.train.data import Sample, prepare
from dicomai.train.fit import predict
from dicomai.train.metrics import auroc
from dicomai.train.nets import ensemble, load_run

__all__ = ["make_ensemble"]


def make_ensemble(runs: list[Path], samples: list[Sample], out_dir: Path,
                  gradcam_from: Path | None = None) -> dict[str, Any]:
    """Write ``best.pt`` and ``history.json`` of the ensemble of ``runs`` into ``out_dir``.

    ``gradcam_from``, one of ``runs``: the Grad-CAM is taken at that member's last stage
    only (see :func:`dicomai.train.nets.ensemble`); by default at all members' stages.
    Returns the summary written: the configuration (the members' configurations), the
    members' own summaries and the validation AUROC of each member and of the ensemble.
    """
    if len(runs) < 2:
        raise ValueError("an ensemble needs at least two runs")
    gradcam_member = None
    if gradcam_from is not None:
        matches = [i for i, run in enumerate(runs) if run.resolve() == gradcam_from.resolve()]
        if len(matches) != 1:
            raise ValueError(f"--gradcam-from {gradcam_from}: not one of the ensemble's runs")
        gradcam_member = matches[0]
    loaded = [load_run(run) for run in runs]
    sizes = {int(summary["config"]["size"]) for _, summary in loaded}
    if len(sizes) != 1:
        raise ValueError(f"the runs were trained at different input sizes: {sorted(sizes)}")
    size = sizes.pop()
    net = ensemble([member for member, _ in loaded], size, gradcam_member)
    val = [s for s in samples if s.split == "val"]
    if not val or len({s.label for s in val}) < 2:
        raise ValueError("the validation split needs both classes to score the ensemble")
    images, _ = prepare(val, size, exact=True)  # the node's own pixels, as `train fit` scores them
    y = np.array([s.label for s in val], np.int64)
    members = []
    for run, (member, summary) in zip(runs, loaded, strict=True):
        members.append({**summary, "run": str(run), "val_auroc": auroc(y, predict(member, images))})
    score = auroc(y, predict(net, images))
    strides = [int(s["config"].get("output_stride", 32)) for _, s in loaded]
    config = {"backbone": "ensemble", "head": "linear", "size": size,
              # the Grad-CAM grid's: the finest member's, or the explained member's
              "output_stride": min(strides) if gradcam_member is None else strides[gradcam_member],
              "members": [s["config"] for _, s in loaded], "gradcam_member": gradcam_member}
    summary = {"config": config, "members": members, "best_val_auroc": score,
               "val_images": len(val), "history": []}
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), out_dir / "best.pt")
    (out_dir / "history.json").write_text(json.dumps(summary, indent=2))
    return summary
