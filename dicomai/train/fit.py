"""Two-phase transfer learning: head on a frozen backbone, then fine-tuning, chosen on val AUROC."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from dicomai.train.data import Sample, prepare
from dicomai.train.degrade import random_mix
from dicomai.train.guidance import box_loss, box_masks, cell_targets, guided_forward
from dicomai.train.metrics import auroc
from dicomai.train.nets import IMAGENET_MEAN, IMAGENET_STD, FractureNet, build
from dicomai.train.tflite_weights import calibrate_batchnorm

__all__ = ["BOX_PHASES", "FitConfig", "fit", "predict", "targets", "training_split"]

BOX_PHASES = ("both", "tune")  # the training phases in which the box loss applies


@dataclass
class FitConfig:
    backbone: str = "efficientnet_lite0"
    head: str = "linear"  # "linear" (GAP, dropout, dense) or "hybrid" (extra conv blocks, MLP)
    output_stride: int = 32  # 16: dilated last stage, Grad-CAM grid twice as fine
    size: int = 224
    batch: int = 32
    head_epochs: int = 2
    head_lr: float = 1e-3
    tune_epochs: int = 10
    tune_lr: float = 2e-4
    tune_blocks: str = "all"  # "all", or "top" (last stages only)
    weight_decay: float = 1e-4
    patience: int = 4
    seed: int = 0
    box_weight: float = 0.0  # >0: box guidance of the Grad-CAM (needs fracture boxes), see guidance.py
    box_phases: str = "both"  # "both", or "tune": no box loss while the head learns on the frozen backbone
    pretrained: bool = True
    limit: int = 0  # >0: only this many images per split (tests)
    device: str = "auto"  # CUDA when present, else the CPU
    exclude_region: str = ""  # leave this region out of training and validation (leave-one-region-out)
    degrade: float = 0.0  # >0: share of training images given a mix of acquisition degradations (degrade.py)
    teacher: str = ""  # distillation (distill.py): the teacher package whose probabilities are soft targets
    teacher_weight: float = 0.0  # target = (1 - w) * label + w * teacher's probability


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _augment() -> v2.Compose:
    # The papers' augmentations: flip, rotation, zoom, shear, contrast, blur, noise.
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, translate=(0.04, 0.04), scale=(0.9, 1.15), shear=5),
        v2.ColorJitter(brightness=0.15, contrast=0.2),
        v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.0))], p=0.2),
    ])


def _to_input(images: torch.Tensor) -> torch.Tensor:
    """N x H x W (uint8 0-255 or float 0-1) -> normalized float N x 3 x H x W (the node's preprocessing)."""
    x = images.float().div(255.0) if images.dtype == torch.uint8 else images.float()
    x = x.unsqueeze(1).repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def _device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def choose_device(wanted: str) -> torch.device:
    """"auto": CUDA when present, else the CPU; or the device named."""
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def predict(net: FractureNet, images: np.ndarray, batch: int = 64) -> np.ndarray:
    net.eval()
    out = []
    device = _device(net)
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = _to_input(torch.from_numpy(images[i:i + batch])).to(device)
            out.append(torch.sigmoid(net(x)).cpu().numpy())
    return np.concatenate(out).astype(np.float64)


def _degraded(images: np.ndarray, masks: np.ndarray | None, idx: np.ndarray, share: float,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """The batch's images (and masks), a ``share`` of them through a random mix of degradations."""
    imgs = images[idx].copy()
    ms = None if masks is None else masks[idx].copy()
    for k in range(len(idx)):
        if rng.random() < share:
            mixed = random_mix(imgs[k].astype(np.float32) / 255.0, rng, keep_size=True,
                               mask=None if ms is None else ms[k])
            imgs[k] = np.round(mixed.image * 255).astype(np.uint8)
            if ms is not None and mixed.mask is not None:
                ms[k] = mixed.mask
    return imgs, ms


def _epoch(net: FractureNet, images: np.ndarray, labels: np.ndarray, opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LRScheduler | None, loss_fn: nn.Module, cfg: FitConfig,
           frozen: bool, progress: str = "", masks: np.ndarray | None = None,
           soft: np.ndarray | None = None) -> float:
    """One pass over the training images; a progress bar on stderr when ``progress`` names it.

    With ``masks`` (box masks, see :mod:`dicomai.train.guidance`) each mask takes the same
    geometric augmentation as its image, and the box loss is added with ``cfg.box_weight``.
    ``soft`` (targets in [0, 1], distillation) replaces the labels in the classification loss;
    the box loss still takes the fractured images from the labels. With ``cfg.degrade`` a share
    of the images first goes through :func:`dicomai.train.degrade.random_mix`.
    """
    net.train()
    if frozen:
        net.backbone.eval()  # keep BatchNorm statistics of the frozen backbone
    aug = _augment()
    order = np.random.permutation(len(images))
    # drawn from the global state (saved in last.pt), so that a resumed run repeats
    rng = np.random.default_rng(int(np.random.randint(2**31))) if cfg.degrade > 0 else None
    total, n = 0.0, 0
    device = _device(net)
    starts = range(0, len(order), cfg.batch)
    for i in tqdm(starts, desc=progress, unit="batch", leave=False, disable=not progress):
        idx = order[i:i + cfg.batch]
        batch, batch_masks = ((images[idx], None if masks is None else masks[idx]) if rng is None
                              else _degraded(images, masks, idx, cfg.degrade, rng))
        if batch_masks is None:
            imgs = torch.stack([aug(torch.from_numpy(im)[None])[0] for im in batch])
        else:
            pairs = [aug(tv_tensors.Image(torch.from_numpy(im)[None]),
                         tv_tensors.Mask(torch.from_numpy(m)[None]))
                     for im, m in zip(batch, batch_masks, strict=True)]
            imgs = torch.stack([im[0] for im, _ in pairs])
            boxes = torch.stack([m[0] for _, m in pairs]).to(device)
        x = _to_input(imgs)
        # noise drawn on the CPU whatever the device, so that runs repeat across devices
        x = x + 0.02 * torch.randn_like(x) * (torch.rand(len(idx), 1, 1, 1) < 0.3)  # light noise
        x = x.to(device)
        y = torch.from_numpy(labels[idx]).float().to(device)
        t = y if soft is None else torch.from_numpy(soft[idx]).float().to(device)
        opt.zero_grad()
        if batch_masks is None:
            loss = loss_fn(net(x), t)
        else:
            logit, cam = guided_forward(net, x)
            cells = cell_targets(boxes, (cam.shape[1], cam.shape[2]))
            loss = loss_fn(logit, t) + cfg.box_weight * box_loss(cam, cells, y > 0.5)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += loss.item() * len(idx)
        n += len(idx)
    return total / n


def _rng_state() -> dict[str, object]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, object]) -> None:
    random.setstate(state["python"])  # type: ignore[arg-type]
    np.random.set_state(state["numpy"])  # type: ignore[arg-type]
    torch.set_rng_state(state["torch"])  # type: ignore[arg-type]


def training_split(samples: list[Sample], cfg: FitConfig) -> dict[str, list[Sample]]:
    """The training and validation samples a run uses: ``cfg.exclude_region`` left out, then ``cfg.limit``."""
    kept = [x for x in samples if not cfg.exclude_region or x.region != cfg.exclude_region]
    split = {s: [x for x in kept if x.split == s] for s in ("train", "val")}
    if cfg.exclude_region and not split["train"]:
        raise ValueError(f"exclude_region {cfg.exclude_region!r} leaves no training image")
    if cfg.limit:
        split = {k: v[: cfg.limit] for k, v in split.items()}
    return split


def targets(samples: list[Sample], cfg: FitConfig, teacher: Mapping[str, float]) -> np.ndarray:
    """Distillation targets: ``(1 - w) * label + w * teacher's probability``, ``w = cfg.teacher_weight``."""
    missing = [s.image_id for s in samples if s.image_id not in teacher]
    if missing:
        raise ValueError(f"no teacher probability for {len(missing)} training images (first: {missing[0]})")
    w = cfg.teacher_weight
    return np.array([(1 - w) * s.label + w * teacher[s.image_id] for s in samples], np.float64)


def fit(samples: list[Sample], cfg: FitConfig, out_dir: Path, log: bool = True,
        resume: bool = False, teacher: Mapping[str, float] | None = None) -> dict[str, object]:
    """Train; write ``best.pt``, ``last.pt`` and ``history.json`` in ``out_dir``; return the summary.

    ``last.pt`` (written after every epoch: weights, optimizer, schedule, RNG states, history)
    lets ``resume=True`` continue an interrupted run where it stopped, with the same result as
    an uninterrupted one. ``teacher`` (image id -> probability) with ``cfg.teacher_weight > 0``
    makes the classification targets soft (see :func:`targets`; :mod:`dicomai.train.distill`).
    """
    _seed(cfg.seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    if not 0.0 <= cfg.teacher_weight <= 1.0 or not 0.0 <= cfg.degrade <= 1.0:
        raise ValueError(f"teacher_weight {cfg.teacher_weight} and degrade {cfg.degrade} must lie in [0, 1]")
    if cfg.teacher_weight > 0 and teacher is None:
        raise ValueError("teacher_weight > 0 needs the teacher's probabilities (train distill)")
    out_dir.mkdir(parents=True, exist_ok=True)
    split = training_split(samples, cfg)
    soft = targets(split["train"], cfg, teacher) if teacher is not None and cfg.teacher_weight > 0 else None
    train_img, train_geoms = prepare(split["train"], cfg.size)
    val_img, _ = prepare(split["val"], cfg.size, exact=True)  # selection on the node's own pixels
    y_train = np.array([s.label for s in split["train"]], np.int64)
    y_val = np.array([s.label for s in split["val"]], np.int64)
    if cfg.box_phases not in BOX_PHASES:
        raise ValueError(f"box_phases: {cfg.box_phases!r}, not one of {BOX_PHASES}")
    masks = None
    if cfg.box_weight > 0:
        if not any(s.boxes for s in split["train"]):
            raise ValueError("--box-weight needs fracture boxes in the training split (FracAtlas layout)")
        masks = box_masks(split["train"], train_geoms, cfg.size)
    net = build(cfg.backbone, pretrained=cfg.pretrained, head=cfg.head, output_stride=cfg.output_stride)
    if cfg.backbone == "mobilenet_v2" and cfg.pretrained:
        # Folded TFLite batch norms get real statistics, so fine-tuning starts where it should.
        calibrate_batchnorm(net.backbone, _to_input(torch.from_numpy(train_img[:64])))
    device = choose_device(cfg.device)
    net.to(device)
    pos = max(int(y_train.sum()), 1)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y_train) - pos) / pos, device=device))
    history: list[dict[str, object]] = []
    best: dict[str, float] = {"auroc": -1.0, "epoch": -1}
    ckpt, last = out_dir / "best.pt", out_dir / "last.pt"
    state: dict[str, object] | None = None
    if resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=False)
        # a setting added since the run began has its default, which is what the run used
        if {**asdict(FitConfig()), **state["config"]} != asdict(cfg):  # type: ignore[dict-item]
            raise ValueError(f"{last}: written with another configuration; start a new run folder")
        net.load_state_dict(state["net"])  # type: ignore[arg-type]
        history, best = state["history"], state["best"]  # type: ignore[assignment]
    elapsed0 = float(state["seconds"]) if state else 0.0  # type: ignore[arg-type]
    t0 = time.time()
    total_epochs = cfg.head_epochs + cfg.tune_epochs
    done = int(state["epoch"]) if state else 0  # type: ignore[call-overload]
    stale = int(state["stale"]) if state else 0  # type: ignore[call-overload]
    stopped = bool(state["stopped"]) if state else False
    steps = cfg.tune_epochs * ((len(train_img) + cfg.batch - 1) // cfg.batch)
    opt: torch.optim.Optimizer | None = None
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    phase = ""
    for epoch in range(done + 1, total_epochs + 1):
        if stopped:
            break
        if (epoch <= cfg.head_epochs) != (phase == "head") or opt is None:
            phase = "head" if epoch <= cfg.head_epochs else "tune"
            opt, sched = _phase(net, cfg, phase, steps)
            if state is not None and state["phase"] == phase:
                opt.load_state_dict(state["opt"])  # type: ignore[arg-type]
                if sched is not None and state["sched"] is not None:
                    sched.load_state_dict(state["sched"])  # type: ignore[arg-type]
            if state is not None:
                _set_rng_state(state["rng"])  # type: ignore[arg-type]
                state = None
        guided = masks is not None and (cfg.box_phases == "both" or phase == "tune")
        loss = _epoch(net, train_img, y_train, opt, sched, loss_fn, cfg, frozen=phase == "head",
                      progress=f"epoch {epoch}/{total_epochs} ({phase})" if log else "",
                      masks=masks if guided else None, soft=soft)
        score = auroc(y_val, predict(net, val_img))
        seconds = elapsed0 + time.time() - t0
        history.append({"epoch": epoch, "phase": phase, "loss": loss, "val_auroc": score,
                        "seconds": round(seconds, 1)})
        if log:
            print(json.dumps(history[-1]), flush=True)
        if score > best["auroc"]:
            best = {"auroc": score, "epoch": epoch}
            torch.save(net.state_dict(), ckpt)
            stale = 0
        elif phase == "tune":
            stale += 1
        stopped = phase == "tune" and stale >= cfg.patience
        tmp = last.with_suffix(".tmp")
        torch.save({"config": asdict(cfg), "epoch": epoch, "phase": phase, "net": net.state_dict(),
                    "opt": opt.state_dict(), "sched": sched.state_dict() if sched else None,
                    "rng": _rng_state(), "history": history, "best": best, "stale": stale,
                    "stopped": stopped, "seconds": seconds}, tmp)
        tmp.replace(last)
        _summary(out_dir, cfg, best, history, device, len(train_img), len(val_img), finished=False)
    return _summary(out_dir, cfg, best, history, device, len(train_img), len(val_img), finished=True)


def _summary(out_dir: Path, cfg: FitConfig, best: dict[str, float], history: list[dict[str, object]],
             device: torch.device, n_train: int, n_val: int, finished: bool) -> dict[str, object]:
    """``history.json``, rewritten after every epoch: a run in progress can be read or released."""
    seconds = float(history[-1]["seconds"]) if history else 0.0  # type: ignore[arg-type]
    summary = {"config": asdict(cfg), "best_epoch": best["epoch"], "best_val_auroc": best["auroc"],
               "seconds": seconds, "history": history, "finished": finished,
               "threads": torch.get_num_threads(), "device": str(device), "train_images": n_train,
               "val_images": n_val}
    (out_dir / "history.json").write_text(json.dumps(summary, indent=2))
    return summary


def _phase(net: FractureNet, cfg: FitConfig, phase: str, steps: int,
           ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """Phase 1: only the new layers learn (backbone frozen). Phase 2: fine-tune at a lower rate."""
    backbone = list(net.backbone.parameters())
    ids = {id(p) for p in backbone}
    new = [p for p in net.parameters() if id(p) not in ids]
    if phase == "head":
        for p in backbone:
            p.requires_grad = False
        return torch.optim.AdamW(new, lr=cfg.head_lr, weight_decay=cfg.weight_decay), None
    tuned = backbone[len(backbone) // 2:] if cfg.tune_blocks == "top" else backbone
    for p in backbone:
        p.requires_grad = False
    for p in tuned:
        p.requires_grad = True
    opt = torch.optim.AdamW([{"params": tuned, "lr": cfg.tune_lr},
                             {"params": new, "lr": cfg.tune_lr * 5}], weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.tune_lr, cfg.tune_lr * 5],
                                                total_steps=max(steps, 1), pct_start=0.15)
    return opt, sched
