"""Bring your own model: a TorchScript or ``torch.export`` program described by its card.

The card's ``program`` section (:class:`pacs_ai.inference.card_schema.ProgramSchema`) names
the file, its outputs and the normalisation; :class:`ProgramClassifier` gives the program the
interface of the built-in classifiers (inputs in [0, 1], logits, penultimate features for
the OOD density). Grad-CAM needs a hookable layer, which a compiled program does not offer:
such models report without a heatmap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pacs_ai.errors import ModelError
from pacs_ai.inference.architectures import Classifier
from pacs_ai.inference.card import ModelCard
from pacs_ai.inference.card_files import read_card_file
from pacs_ai.inference.card_schema import ProgramSchema


class ProgramClassifier(Classifier):
    def __init__(self, program: nn.Module, spec: ProgramSchema, in_channels: int) -> None:
        norm = spec.normalization.mode
        super().__init__(program, "", "per_image" if norm == "per_image" else "fixed")
        self._spec = spec
        self._repeat = (spec.channels or in_channels) // in_channels
        channels = spec.channels or in_channels
        mean = spec.normalization.mean or [0.0] * channels
        std = spec.normalization.std or [1.0] * channels
        if norm == "mean_std" and not (len(mean) == len(std) == channels):
            raise ModelError(f"normalization mean/std need {channels} values each")
        self._mean_std = norm == "mean_std"
        self._mean = nn.Buffer(torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self._std = nn.Buffer(torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> ProgramClassifier:
        # an exported program has no train/eval switch (it was exported for inference)
        self.training = mode
        return self

    def _outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self._repeat > 1:
            x = x.repeat(1, self._repeat, 1, 1)
        if self._mean_std:
            x = (x - self._mean) / self._std
        elif self.normalize == "per_image":
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) / x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
        else:
            x = (x - 0.5) / 0.5
        out: Any = self.backbone(x)
        values = list(out) if isinstance(out, (tuple, list)) else [out]
        if len(values) != len(self._spec.outputs):
            raise ModelError(
                f"the program returned {len(values)} outputs, the card names "
                f"{len(self._spec.outputs)}"
            )
        return dict(zip(self._spec.outputs, values, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._outputs(x)[self._spec.logits_output]

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = self._outputs(x)
        logits = outs[self._spec.logits_output]
        name = self._spec.feature_output
        if name is None:  # no features: OOD cannot be fitted (fit_ood refuses), scoring works
            return logits, logits.flatten(1)
        return logits, outs[name].flatten(1)


def load_program(model_dir: Path, card: ModelCard) -> ProgramClassifier:
    spec = ProgramSchema.model_validate(card.program)
    path = model_dir / spec.file
    read_card_file(model_dir, spec.file, spec.sha256)
    try:
        if card.format == "torchscript":
            program: nn.Module = torch.jit.load(str(path), map_location="cpu")
        else:
            program = torch.export.load(str(path)).module()
    except Exception as exc:  # a broken program raises many types
        raise ModelError(f"cannot load {card.format} program {spec.file}: {exc}") from exc
    return ProgramClassifier(program, spec, card.input.channels)
