"""Grad-CAM (Selvaraju et al. 2017) on the model's last convolutional stage."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pacs_ai.inference.architectures import Classifier


def grad_cam(model: Classifier, image: torch.Tensor, class_index: int) -> np.ndarray:
    """Heatmap (H, W) float32 in [0, 1] of where ``image`` (1, C, H, W) drives the logit of
    ``class_index``: ReLU of the activations weighted by their spatial mean gradient,
    upsampled to the input size, divided by its maximum (all zero when nothing supports it).
    """
    store: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        store["act"] = output

    handle = model.cam_layer.register_forward_hook(keep)
    try:
        with torch.enable_grad(), torch.autocast(image.device.type, enabled=False):
            x = image.detach().float().requires_grad_(False)
            logits = model(x)
            model.zero_grad(set_to_none=True)
            logits[0, class_index].backward()
    finally:
        handle.remove()
    act = store["act"]
    grad = act.grad
    if grad is None:
        return np.zeros(image.shape[-2:], dtype=np.float32)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(dim=1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    top = float(cam.max())
    out = (cam / top) if top > 0 else torch.zeros_like(cam)
    model.zero_grad(set_to_none=True)
    return out.float().cpu().numpy().astype(np.float32)
