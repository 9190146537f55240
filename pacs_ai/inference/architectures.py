"""torchvision-based classifiers with the input normalisation built in.

Every model takes (N, C, S, S) float32 in [0, 1] (:mod:`pacs_ai.imaging.prepare`) and returns
logits. Normalisation lives in the model so training and inference cannot disagree:
``per_image`` (chest X-ray: zero mean, unit variance per image, which removes the global
brightness/contrast differences between vendors' windows) or ``fixed`` (CT: windows are
absolute HU already; (x - 0.5) / 0.5).

Architectures (``weights=None`` always; nothing is downloaded):

- ``resnet18``: torchvision ResNet-18, first convolution adapted to C channels.
- ``resnet18_slim``: the ResNet-18 layout (BasicBlock x [2, 2, 2, 2]) with widths 24-48-96-192:
  1.6 M parameters, ~0.5 GFLOP at 224². Dense 3x3 convolutions use the CPU far better than
  depthwise ones (measured in benchmarks/inference.py); this is the bundled demo models' arch.
- ``mobilenet_v3_small``: torchvision MobileNetV3-Small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torchvision.models import mobilenet_v3_small, resnet18
from torchvision.models.resnet import BasicBlock, ResNet

from pacs_ai.errors import ModelError

Normalize = Literal["per_image", "fixed"]


class Classifier(nn.Module):
    """A backbone with input normalisation; ``cam_layer`` is the last convolutional stage
    (its output feeds Grad-CAM)."""

    def __init__(self, backbone: nn.Module, cam_layer: str, normalize: Normalize) -> None:
        super().__init__()
        self.backbone = backbone
        self._cam_layer = cam_layer
        self.normalize = normalize

    @property
    def cam_layer(self) -> nn.Module | None:
        """The Grad-CAM layer, or None (a bring-your-own program has no hookable layer)."""
        return self.backbone.get_submodule(self._cam_layer) if self._cam_layer else None

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the penultimate features (the input of the last linear layer), which
        the out-of-distribution density (:mod:`pacs_ai.inference.ood`) is fitted on."""
        head = [m for m in self.backbone.modules() if isinstance(m, nn.Linear)][-1]
        captured: list[torch.Tensor] = []

        def keep(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured.append(args[0])

        handle = head.register_forward_pre_hook(keep)
        try:
            logits = self(x)
        finally:
            handle.remove()
        return logits, captured[0].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize == "per_image":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
            x = (x - mean) / std
        else:
            x = (x - 0.5) / 0.5
        out: torch.Tensor = self.backbone(x)
        return out


def _resnet(widths: tuple[int, int, int, int], channels: int, classes: int) -> ResNet:
    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=classes)
    model.inplanes = widths[0]
    model.conv1 = nn.Conv2d(channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(widths[0])
    model.layer1 = model._make_layer(BasicBlock, widths[0], 2)
    model.layer2 = model._make_layer(BasicBlock, widths[1], 2, stride=2)
    model.layer3 = model._make_layer(BasicBlock, widths[2], 2, stride=2)
    model.layer4 = model._make_layer(BasicBlock, widths[3], 2, stride=2)
    model.fc = nn.Linear(widths[3], classes)
    for m in model.modules():  # torchvision's init for the replaced layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def _build_resnet18(channels: int, classes: int) -> tuple[nn.Module, str]:
    model = resnet18(weights=None, num_classes=classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model, "layer4"


def _build_resnet18_slim(channels: int, classes: int) -> tuple[nn.Module, str]:
    return _resnet((24, 48, 96, 192), channels, classes), "layer4"


def _build_mobilenet(channels: int, classes: int) -> tuple[nn.Module, str]:
    model = mobilenet_v3_small(weights=None, num_classes=classes)
    first = model.features[0][0]
    model.features[0][0] = nn.Conv2d(
        channels, first.out_channels, kernel_size=3, stride=2, padding=1, bias=False
    )
    return model, "features.12"


ARCHITECTURES: dict[str, Callable[[int, int], tuple[nn.Module, str]]] = {
    "resnet18": _build_resnet18,
    "resnet18_slim": _build_resnet18_slim,
    "mobilenet_v3_small": _build_mobilenet,
}


def build_model(arch: str, channels: int, classes: int, normalize: Normalize) -> Classifier:
    """A freshly initialised :class:`Classifier` (no pretrained weights, no download)."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError as exc:
        raise ModelError(f"unknown architecture {arch!r}; known: {sorted(ARCHITECTURES)}") from exc
    backbone, cam_layer = factory(channels, classes)
    return Classifier(backbone, cam_layer, normalize)
