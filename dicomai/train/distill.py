"""Distillation: one network trained on a released package's probabilities (the teacher).

The shipped model is an ensemble of four networks; one network costs a quarter of its CPU
time or less. The teacher's probabilities on the training images, computed once with the
node's own inference code (onnxruntime) and cached in the run folder, become soft targets,

    target = (1 - w) * label + w * p_teacher,   w = ``--teacher-weight``,

in :func:`dicomai.train.fit.fit`'s binary cross-entropy; everything else is ``train fit``'s
loop: the two phases, the box-guided Grad-CAM loss (``--box-weight``), the degradations of
:mod:`dicomai.train.degrade` as augmentation (``--degrade``), ``--resume``. The run folder is a
``train fit`` run: ``train release`` packages it as any other.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from dicomai.model.classifier import Classifier, preprocess
from dicomai.model.package import load_package, sha256_file
from dicomai.train.data import Sample, load_display
from dicomai.train.fit import FitConfig, fit, training_split

__all__ = ["TEACHER_CACHE", "distill", "teacher_probabilities"]

TEACHER_CACHE = "teacher.json"


def teacher_probabilities(package_dir: Path, samples: list[Sample], cache: Path,
                          threads: int = 0, batch: int = 8) -> dict[str, float]:
    """The package's probability for each sample (image id -> p), cached in ``cache``.

    The cache is reused for the ids it holds when it was written by the same model file
    (sha256); the other samples are run and added.
    """
    package = load_package(package_dir)
    digest = sha256_file(package.onnx_path)
    known: dict[str, float] = {}
    if cache.exists():
        stored = json.loads(cache.read_text())
        if stored.get("sha256") == digest:
            known = {str(k): float(v) for k, v in stored["probabilities"].items()}
    todo = [s for s in samples if s.image_id not in known]
    if todo:
        clf = Classifier(package, threads=threads, providers=["CPUExecutionProvider"], max_batch=batch)
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            outs = clf.predict([preprocess(load_display(s.path), package) for s in chunk])
            known.update({s.image_id: float(o.probability) for s, o in zip(chunk, outs, strict=True)})
        cache.parent.mkdir(parents=True, exist_ok=True)
        record = {"package": f"{package.manifest.name} {package.manifest.version}", "sha256": digest,
                  "probabilities": known}
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(cache)
    return {s.image_id: known[s.image_id] for s in samples}


def distill(samples: list[Sample], cfg: FitConfig, out_dir: Path, teacher: Path, log: bool = True,
            resume: bool = False) -> dict[str, object]:
    """Train one network on ``teacher``'s soft targets (see the module docstring); ``fit``'s summary."""
    if not 0.0 < cfg.teacher_weight <= 1.0:
        raise ValueError(f"teacher_weight {cfg.teacher_weight}: distillation needs a weight in (0, 1]")
    cfg = replace(cfg, teacher=str(teacher.resolve()))
    train = training_split(samples, cfg)["train"]
    probs = teacher_probabilities(teacher, train, out_dir / TEACHER_CACHE)
    return fit(samples, cfg, out_dir, log=log, resume=resume, teacher=probs)
