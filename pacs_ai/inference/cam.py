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

    layer = model.cam_layer
    if layer is None:
        return np.zeros(image.shape[-2:], dtype=np.float32)
    handle = layer.register_forward_hook(keep)
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


def body_mask(image: np.ndarray) -> np.ndarray:
    """Where the body is in a display image (H, W) in [0, 1]: pixels above Otsu's threshold,
    closed, with enclosed holes (the lungs) filled, largest connected region only. Outside it
    (air around the patient, letterbox padding) a heatmap says nothing."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    hist, edges = np.histogram(img, bins=64, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    total = weight[-1]
    if total == 0:
        return np.zeros(img.shape, dtype=bool)
    mean_low = np.cumsum(hist * centres) / np.maximum(weight, 1)
    mean_all = float((hist * centres).sum() / total)
    between = weight * (total - weight) * (mean_low - mean_all) ** 2 / np.maximum(total - weight, 1)
    threshold = centres[int(np.argmax(between))]
    mask = ndimage.binary_closing(img > threshold, iterations=3)
    mask = ndimage.binary_fill_holes(mask)
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros(img.shape, dtype=bool)
    largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    return np.asarray(labels == largest)
