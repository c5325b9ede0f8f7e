"""Box guidance: a training loss that pulls the positive class's Grad-CAM into the fracture boxes.

Image labels alone let the network use whatever region predicts the label (the limb's soft
tissue, the hand, the neck): its Grad-CAM then shows that region, not the fracture. Where a
dataset has fracture boxes (FracAtlas), fractured training images add a second term to the
loss: the Grad-CAM logits over the grid, as a spatial softmax, should put their mass on the
cells of the boxes,

    L_box = -log( sum_{cells c in the boxes} softmax(cam)_c ),

averaged over the fractured images of a batch and weighted by ``--box-weight``. The map is the
one the node exports (the head's exact gradient times the last stage's activations; see
``ExportWrapper``), before its ReLU. The cells that count are those whose centre lies inside
a box, because the node's bilinear upsampling always peaks at a cell centre, so only those can
put the map's maximum inside the box; for a box too small to hold a centre, the cells it
touches. Nothing changes at inference: the exported graph is the same.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from dicomai.imaging.pixels import Letterbox
from dicomai.train.data import Sample
from dicomai.train.nets import FractureNet

__all__ = ["box_loss", "box_masks", "cell_targets", "guided_forward"]


def box_masks(samples: list[Sample], geoms: list[Letterbox], size: int) -> NDArray[np.uint8]:
    """N x size x size masks, 1 inside the samples' boxes, in letterboxed input coordinates."""
    out = np.zeros((len(samples), size, size), np.uint8)
    for i, (s, g) in enumerate(zip(samples, geoms, strict=True)):
        sy, sx = g.new_h / g.src_h, g.new_w / g.src_w
        for x, y, w, h in s.boxes:
            x0, y0 = int(np.floor(g.left + x * sx)), int(np.floor(g.top + y * sy))
            x1, y1 = int(np.ceil(g.left + (x + w) * sx)), int(np.ceil(g.top + (y + h) * sy))
            out[i, max(y0, 0):max(y1, y0 + 1), max(x0, 0):max(x1, x0 + 1)] = 1
    return out


def cell_targets(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """N x h x w booleans: the grid cells whose centre is in a box, else the cells a box touches."""
    n, height, width = masks.shape
    h, w = grid
    rows = ((torch.arange(h, device=masks.device) + 0.5) * height / h).long().clamp(max=height - 1)
    cols = ((torch.arange(w, device=masks.device) + 0.5) * width / w).long().clamp(max=width - 1)
    m = masks > 0
    centres = m[:, rows][:, :, cols]
    touched = torch.nn.functional.adaptive_max_pool2d(m[:, None].float(), grid)[:, 0] > 0
    has_centre = centres.flatten(1).any(1)
    return torch.where(has_centre[:, None, None], centres, touched)


def guided_forward(net: FractureNet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training logit N, Grad-CAM logits N x h x w before the ReLU) in one pass."""
    a = net.features(x)
    pooled = a.mean(dim=(2, 3))
    logit = net.head(pooled)  # train-mode head (dropout) for the classification loss
    _, grad = net.head.with_gradient(pooled)  # the exported map's channel weights
    cam = torch.einsum("nkhw,nk->nhw", a, grad)
    return logit, cam


def box_loss(cam: torch.Tensor, targets: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean -log(softmax mass on the target cells) over positive images that have target cells."""
    use = positive & targets.flatten(1).any(1)
    if not bool(use.any()):
        return cam.sum() * 0.0
    flat = cam[use].flatten(1)
    inside = flat.masked_fill(~targets[use].flatten(1), float("-inf"))
    return (torch.logsumexp(flat, 1) - torch.logsumexp(inside, 1)).mean()
