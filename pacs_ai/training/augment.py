"""Batched training augmentation in torch: the seed notebook's shear, zoom and horizontal flip
(Keras ``shear_range=0.2, zoom_range=0.2, horizontal_flip=True``) plus intensity changes
(gamma, contrast, brightness, noise) that mimic other exposures and vendors' windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    shear: float = 0.2,
    zoom: float = 0.2,
    flip: bool = True,
    intensity: bool = True,
) -> torch.Tensor:
    """Augment a batch (N, C, S, S) in [0, 1]; returns a new tensor in [0, 1]."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    z = uniform(1 - zoom, 1 + zoom)
    s = uniform(-shear, shear)
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0) if flip else 1.0
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = sign / z
    theta[:, 0, 1] = s / z
    theta[:, 1, 1] = 1 / z
    theta[:, 0, 2] = uniform(-0.05, 0.05)
    theta[:, 1, 2] = uniform(-0.05, 0.05)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if intensity:
        gamma = uniform(0.7, 1.4).view(n, 1, 1, 1)
        contrast = uniform(0.8, 1.2).view(n, 1, 1, 1)
        bright = uniform(-0.08, 0.08).view(n, 1, 1, 1)
        out = ((out.clamp(0, 1) ** gamma) - 0.5) * contrast + 0.5 + bright
    noise = uniform(0.0, 0.03).view(n, 1, 1, 1)
    out = out + noise * torch.randn(out.shape, generator=generator)
    return out.clamp(0, 1)
