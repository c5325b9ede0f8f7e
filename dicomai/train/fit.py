"""Two-phase transfer learning: head on a frozen backbone, then fine-tuning, chosen on val AUROC."""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2

from dicomai.train.data import Sample, prepare
from dicomai.train.metrics import auroc
from dicomai.train.nets import IMAGENET_MEAN, IMAGENET_STD, FractureNet, build

__all__ = ["FitConfig", "fit", "predict"]


@dataclass
class FitConfig:
    backbone: str = "efficientnet_lite0"
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
    pretrained: bool = True
    limit: int = 0  # >0: only this many images per split (tests)


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
    """uint8 N x H x W -> normalized float N x 3 x H x W (the node's preprocessing)."""
    x = images.float().div(255.0).unsqueeze(1).repeat(1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def predict(net: FractureNet, images: np.ndarray, batch: int = 64) -> np.ndarray:
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = _to_input(torch.from_numpy(images[i:i + batch]))
            out.append(torch.sigmoid(net(x)).numpy())
    return np.concatenate(out).astype(np.float64)


def _epoch(net: FractureNet, images: np.ndarray, labels: np.ndarray, opt: torch.optim.Optimizer,
           sched: torch.optim.lr_scheduler.LRScheduler | None, loss_fn: nn.Module, cfg: FitConfig,
           frozen: bool) -> float:
    net.train()
    if frozen:
        net.features.eval()  # keep BatchNorm statistics of the frozen backbone
    aug = _augment()
    order = np.random.permutation(len(images))
    total, n = 0.0, 0
    for i in range(0, len(order), cfg.batch):
        idx = order[i:i + cfg.batch]
        imgs = torch.stack([aug(torch.from_numpy(images[j])[None])[0] for j in idx])
        x = _to_input(imgs)
        x = x + 0.02 * torch.randn_like(x) * (torch.rand(len(idx), 1, 1, 1) < 0.3)  # light noise
        y = torch.from_numpy(labels[idx]).float()
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += loss.item() * len(idx)
        n += len(idx)
    return total / n


def fit(samples: list[Sample], cfg: FitConfig, out_dir: Path, log: bool = True) -> dict[str, object]:
    """Train; write ``best.pt`` and ``history.json`` in ``out_dir``; return the summary."""
    _seed(cfg.seed)
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    split = {s: [x for x in samples if x.split == s] for s in ("train", "val")}
    if cfg.limit:
        split = {k: v[: cfg.limit] for k, v in split.items()}
    t0 = time.time()
    train_img, _ = prepare(split["train"], cfg.size)
    val_img, _ = prepare(split["val"], cfg.size)
    y_train = np.array([s.label for s in split["train"]], np.int64)
    y_val = np.array([s.label for s in split["val"]], np.int64)
    net = build(cfg.backbone, pretrained=cfg.pretrained)
    pos = max(int(y_train.sum()), 1)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(y_train) - pos) / pos))
    history: list[dict[str, object]] = []
    best = {"auroc": -1.0, "epoch": -1}
    ckpt = out_dir / "best.pt"

    def evaluate(epoch: int, phase: str, loss: float) -> bool:
        score = auroc(y_val, predict(net, val_img))
        history.append({"epoch": epoch, "phase": phase, "loss": loss, "val_auroc": score,
                        "seconds": round(time.time() - t0, 1)})
        if log:
            print(json.dumps(history[-1]), flush=True)
        if score > best["auroc"]:
            best.update(auroc=score, epoch=epoch)
            torch.save(net.state_dict(), ckpt)
            return True
        return False

    for p in net.features.parameters():
        p.requires_grad = False
    opt: torch.optim.Optimizer = torch.optim.AdamW(net.head.parameters(), lr=cfg.head_lr,
                                                   weight_decay=cfg.weight_decay)
    epoch = 0
    for _ in range(cfg.head_epochs):
        epoch += 1
        evaluate(epoch, "head", _epoch(net, train_img, y_train, opt, None, loss_fn, cfg, frozen=True))
    params = list(net.features.parameters())
    if cfg.tune_blocks == "top":
        params = params[len(params) // 2:]
    for p in params:
        p.requires_grad = True
    opt = torch.optim.AdamW([{"params": params, "lr": cfg.tune_lr},
                             {"params": net.head.parameters(), "lr": cfg.tune_lr * 5}],
                            weight_decay=cfg.weight_decay)
    steps = cfg.tune_epochs * ((len(train_img) + cfg.batch - 1) // cfg.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.tune_lr, cfg.tune_lr * 5],
                                                total_steps=max(steps, 1), pct_start=0.15)
    stale = 0
    for _ in range(cfg.tune_epochs):
        epoch += 1
        improved = evaluate(epoch, "tune", _epoch(net, train_img, y_train, opt, sched, loss_fn, cfg,
                                                  frozen=False))
        stale = 0 if improved else stale + 1
        if stale >= cfg.patience:
            break
    summary = {"config": asdict(cfg), "best_epoch": best["epoch"], "best_val_auroc": best["auroc"],
               "seconds": round(time.time() - t0, 1), "history": history,
               "threads": torch.get_num_threads(), "train_images": len(train_img),
               "val_images": len(val_img)}
    (out_dir / "history.json").write_text(json.dumps(summary, indent=2))
    return summary
