"""The model card format, as a pydantic model: :func:`validate_card` checks every card that
:func:`pacs_ai.inference.card.load_card` reads, and :func:`json_schema` is the JSON Schema
published in docs/model-card.schema.json (a test keeps the file in step with this module).

A card describes either a built-in architecture (``format = "builtin"``, weights in
safetensors or a state dict) or a program the user brings (``"torchscript"``: a
``torch.jit.save`` file; ``"torch_export"``: a ``torch.export.save`` file) with what the
program needs: input size and channels, normalisation, classes and their finding codes, and
the names of its outputs (one tensor: the logits; a tuple: one name per element, e.g.
``["logits", "features"]``) with the one that holds the features for the OOD density.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pacs_ai.errors import ModelError

_Name = Annotated[str, Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSchema(_Strict):
    scheme: Annotated[str, Field(min_length=1, max_length=16)]
    value: Annotated[str, Field(min_length=1, max_length=64)]
    meaning: Annotated[str, Field(min_length=1, max_length=64)]


class FindingSchema(_Strict):
    label: _Name
    code: CodeSchema


class InputSchema(_Strict):
    kind: Literal["cxr", "ct"]
    size: Annotated[int, Field(ge=16, le=2048)]
    channels: Annotated[int, Field(ge=1, le=8)] | None = None
    # CT: one (center, width) window in HU per channel
    windows: list[Annotated[list[float], Field(min_length=2, max_length=2)]] = []
    ct_slices: Annotated[int, Field(ge=1, le=1000)] = 24
    range: str | None = None


class NormalizationSchema(_Strict):
    """How a program's input is normalised before it runs: ``per_image`` (zero mean, unit
    variance per image), ``fixed`` ((x - 0.5) / 0.5) or ``mean_std`` (per channel, the
    ``mean`` and ``std`` lists, e.g. ImageNet's)."""

    mode: Literal["per_image", "fixed", "mean_std"]
    mean: list[float] = []
    std: list[Annotated[float, Field(gt=0)]] = []


class ProgramSchema(_Strict):
    file: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^/\\]+$")]
    sha256: Annotated[str, Field(pattern=r"^([0-9a-f]{64})?$")] = ""
    outputs: Annotated[list[_Name], Field(min_length=1)] = ["logits"]
    logits_output: _Name = "logits"
    feature_output: _Name | None = None
    # channels the program takes when they differ from the input's (a 1-channel X-ray is
    # repeated, e.g. for an ImageNet network that takes 3)
    channels: Annotated[int, Field(ge=1, le=8)] | None = None
    normalization: NormalizationSchema = NormalizationSchema(mode="per_image")

    @model_validator(mode="after")
    def _outputs_named(self) -> ProgramSchema:
        if self.logits_output not in self.outputs:
            raise ValueError(f"logits_output {self.logits_output!r} is not among outputs")
        if self.feature_output is not None and self.feature_output not in self.outputs:
            raise ValueError(f"feature_output {self.feature_output!r} is not among outputs")
        return self


class OodSchema(_Strict):
    method: str
    feature: str
    file: str
    sha256: str = ""
    series_score: str = ""
    threshold: Annotated[float, Field(gt=0)]
    quantile: Annotated[float, Field(ge=0.5, lt=1)]
    heldout_units: int = 0
    false_refusal_rate: dict[str, Any] = {}


class CardSchema(_Strict):
    """A model card (``card.json``)."""

    name: _Name
    version: _Name
    kind: Literal["cxr", "ct"]
    arch: _Name
    demo: bool = False
    intended_use: str = ""
    classes: Annotated[list[_Name], Field(min_length=2)]
    findings: list[FindingSchema] = []
    input: InputSchema
    temperature: Annotated[float, Field(gt=0)] = 1.0
    aggregation: str = "none"
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]]
    threshold_policy: str = ""
    weights_file: str = "model.safetensors"
    weights_sha256: str = ""
    training: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    ood: OodSchema | None = None
    reference: dict[str, Any] = {}
    format: Literal["builtin", "torchscript", "torch_export"] = "builtin"
    program: ProgramSchema | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CardSchema:
        labels = [f.label for f in self.findings]
        if not set(labels) <= set(self.classes):
            raise ValueError("every finding label must be one of the classes")
        if set(self.thresholds) != set(labels):
            raise ValueError("thresholds must name exactly the findings' labels")
        if (self.format == "builtin") != (self.program is None):
            raise ValueError('"program" is required for, and only for, a non-builtin format')
        if self.input.kind != self.kind:
            raise ValueError("input.kind must equal kind")
        derived = 1 if self.kind == "cxr" else len(self.input.windows)
        if self.input.channels is not None and self.input.channels != derived:
            raise ValueError(f"input.channels must be {derived} (1 for cxr, one per CT window)")
        return self


def validate_card(data: Any) -> CardSchema:
    """Raise :class:`ModelError` naming the first problems when ``data`` is not a valid card."""
    try:
        return CardSchema.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'card'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise ModelError(f"model card is invalid: {problems}") from exc


def json_schema() -> dict[str, Any]:
    schema = CardSchema.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "pacs-ai model card"
    return schema
