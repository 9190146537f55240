"""Load a model directory and score series: device selection, batching, mixed precision.

:func:`load_model` reads ``card.json`` and the weights (safetensors or a torch state dict),
refuses models that fail :func:`pacs_ai.inference.card.check_deployable`, moves the model to
the device (``auto``: CUDA if available, else CPU) in channels_last memory format, and warms
it up. :meth:`LoadedModel.score_series` decodes the files in decode processes
(:mod:`pacs_ai.inference.decodepool`, when given a pool; else background threads) while the
model runs on the previous batch, batches across all images of all series, and aggregates per
series (:mod:`pacs_ai.inference.aggregate`). Preprocessing is the tensor path of
:mod:`pacs_ai.imaging.tensorprep`: on a CPU model the decode processes finish each input
(table lookup, letterbox) themselves; on CUDA they send the raw stored bits and the lookup
and letterbox run batched on the GPU (pinned memory, non-blocking copies).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pacs_ai.errors import ModelError, NotApplicable
from pacs_ai.imaging.decode import read_header
from pacs_ai.imaging.gating import xray_image_problem
from pacs_ai.imaging.prepare import ct_scored_slices, stack_inputs
from pacs_ai.imaging.tensorprep import Decoded, PrepTask, finish, prepare_task
from pacs_ai.inference.aggregate import aggregate, suspicion
from pacs_ai.inference.architectures import Classifier, build_model
from pacs_ai.inference.cam import body_mask, grad_cam
from pacs_ai.inference.card import (
    SAFETENSORS_FILE,
    STATE_DICT_FILE,
    ModelCard,
    check_deployable,
    load_card,
)
from pacs_ai.inference.decodepool import DecodePool
from pacs_ai.inference.ood import OodDensity, refusal_reason
from pacs_ai.inference.precision import (
    DEFAULT_BF16_TOLERANCE,
    PrecisionChoice,
    auto_cpu_precision,
)

log = logging.getLogger(__name__)
Precision = Literal["auto", "fp32", "bf16", "fp16"]
_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class SeriesScore:
    """The score of one series.

    ``probabilities``: calibrated probability per class label (sums to 1).
    ``present``: per reportable finding label, probability >= its threshold.
    ``thresholds``: the operating threshold per reportable finding label.
    ``used_instances``: SOP Instance UIDs of the images that were scored.
    ``heatmap``: Grad-CAM (H, W) float32 in [0, 1] over ``display_image`` for the most
    probable finding (``heatmap_label``), zero outside the body
    (:func:`pacs_ai.inference.cam.body_mask`), or None (no reportable finding class).
    ``display_image``: (H, W) float32 in [0, 1]: the preprocessed X-ray, or the most
    suspicious CT slice in the lung window.
    """

    probabilities: dict[str, float]
    present: dict[str, bool]
    thresholds: dict[str, float]
    used_instances: list[str]
    heatmap: np.ndarray | None
    display_image: np.ndarray | None
    ood_score: float | None = None
    ood_threshold: float | None = None
    heatmap_label: str | None = None  # the finding (code meaning) the heatmap is for

    @property
    def refusal(self) -> str | None:
        """Why the series is refused as out of distribution, or None (in distribution, or
        the model has no OOD density)."""
        if self.ood_score is None or self.ood_threshold is None:
            return None
        if self.ood_score <= self.ood_threshold:
            return None
        return refusal_reason(self.ood_score, self.ood_threshold)


def select_device(device: str = "auto") -> torch.device:
    """``auto``: the first CUDA device if one is usable, else the CPU."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available")
        return torch.device("cuda", dev.index or 0)
    if dev.type != "cpu":
        raise ModelError(f"unsupported device {device!r}")
    return dev


def _autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The configured autocast type; ``auto`` on the CPU is fp32 here and is decided by
    :func:`pacs_ai.inference.precision.auto_cpu_precision` once the model is loaded."""
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ModelError("fp16 autocast needs a CUDA device")
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def save_weights(model: torch.nn.Module, model_dir: Path, half: bool = True) -> tuple[str, str]:
    """Write the state dict as safetensors (fp16 floats when ``half``: half the size, the
    model runs in fp32 after loading). Returns (file name, sha256)."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    path = model_dir / SAFETENSORS_FILE
    save_file(state, str(path))
    return path.name, _sha256(path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _load_state(model_dir: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    path = model_dir / card.weights_file
    if not path.is_file():
        alternatives = [model_dir / n for n in (SAFETENSORS_FILE, STATE_DICT_FILE)]
        path = next((p for p in alternatives if p.is_file()), path)
    if not path.is_file():
        raise ModelError(f"no weights in {model_dir} (expected {card.weights_file})")
    if card.weights_sha256 and _sha256(path) != card.weights_sha256:
        raise ModelError(f"{path.name} does not match the sha256 in the model card")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types
        raise ModelError(f"cannot read weights {path.name}: {exc}") from exc
    if not isinstance(state, dict):
        raise ModelError(f"{path.name} is not a state dict")
    return state


def build_from_card(card: ModelCard) -> Classifier:
    return build_model(
        card.arch,
        card.input.channels,
        len(card.classes),
        "per_image" if card.kind == "cxr" else "fixed",
    )


class LoadedModel:
    """One loaded, warmed-up classifier (see module doc). ``card``: its :class:`ModelCard`;
    ``device``: the device actually used ("cpu", "cuda:0")."""

    def __init__(
        self,
        card: ModelCard,
        model: Classifier,
        device: torch.device,
        batch_size: int = 16,
        precision: Precision = "auto",
        decode_pool: DecodePool | None = None,
    ) -> None:
        self.card = card
        # decode processes (shared by the models of one scoring process); None: threads
        self.decode_pool = decode_pool
        self.batch_size = max(1, int(batch_size))
        self._torch_device = device
        self.device = str(device)
        self._autocast = _autocast_dtype(device, precision)
        # why this precision (start-up summary); empty when configured explicitly
        self.precision_reason = "auto: mixed precision on CUDA" if precision == "auto" else ""
        self._model = model.to(device).to(memory_format=torch.channels_last).eval()
        self._finding_idx = [card.classes.index(f.label) for f in card.findings]
        self._lock = threading.Lock()  # one scoring call at a time per model
        self.ood: OodDensity | None = None  # set by load_model when the card has one

    @property
    def module(self) -> Classifier:
        return self._model

    @property
    def precision(self) -> str:
        """The arithmetic actually used: "fp32", or the autocast type ("bf16", "fp16")."""
        if self._autocast == torch.bfloat16:
            return "bf16"
        if self._autocast == torch.float16:
            return "fp16"
        return "fp32"

    def warm_up(self) -> None:
        s, c = self.card.input.size, self.card.input.channels
        self.predict(np.zeros((1, c, s, s), dtype=np.float32))

    def use_precision(self, choice: PrecisionChoice) -> None:
        """Run from now on with ``choice`` (before the model is shared between threads)."""
        self._autocast = choice.autocast
        self.precision_reason = choice.reason

    def predict_as(self, inputs: np.ndarray, autocast: torch.dtype | None) -> np.ndarray:
        """Probabilities (N, K) computed with ``autocast`` (None: fp32), whatever the
        configured precision: the bf16 vs fp32 comparison."""
        out = [
            self._forward(np.ascontiguousarray(inputs[i : i + self.batch_size]), autocast)[0]
            for i in range(0, len(inputs), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, len(self.card.classes)))

    def _forward(
        self, batch: np.ndarray, autocast: torch.dtype | Literal["configured"] | None = "configured"
    ) -> tuple[np.ndarray, np.ndarray]:
        """Calibrated probabilities (N, K) and penultimate features (N, D) in float64."""
        return self._forward_tensor(torch.from_numpy(batch), autocast)

    def _forward_tensor(
        self,
        batch: torch.Tensor,
        autocast: torch.dtype | Literal["configured"] | None = "configured",
    ) -> tuple[np.ndarray, np.ndarray]:
        dtype = self._autocast if autocast == "configured" else autocast
        if batch.device != self._torch_device:
            if self._torch_device.type == "cuda":
                batch = batch.pin_memory()
            batch = batch.to(self._torch_device, non_blocking=True)
        x = batch.contiguous(memory_format=torch.channels_last)
        ctx = (
            torch.autocast(self._torch_device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            raw, features = self._model.logits_and_features(x)
            logits = raw.float() / self.card.temperature
            probs = torch.softmax(logits, dim=1).cpu().numpy().astype(np.float64)
            return probs, features.float().cpu().numpy().astype(np.float64)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, K) for model inputs (N, C, S, S), in batches."""
        return self.predict_with_features(inputs)[0]

    def predict_with_features(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, K) and penultimate features (N, D), in batches."""
        out = [
            self._forward(np.ascontiguousarray(inputs[i : i + self.batch_size]))
            for i in range(0, len(inputs), self.batch_size)
        ]
        if not out:
            return np.zeros((0, len(self.card.classes))), np.zeros((0, 0))
        return np.concatenate([p for p, _ in out]), np.concatenate([f for _, f in out])

    def heatmap(self, model_input: np.ndarray, class_label: str) -> np.ndarray:
        """Grad-CAM over one model input (C, S, S) for ``class_label``."""
        x = torch.from_numpy(model_input[None].astype(np.float32)).to(self._torch_device)
        x = x.contiguous(memory_format=torch.channels_last)
        return grad_cam(self._model, x, self.card.classes.index(class_label))

    def score_series(
        self, series: Sequence[Sequence[Path]], *, heatmaps: bool = True
    ) -> list[SeriesScore]:
        """Score each series (the DICOM files of one series per inner sequence).

        Images of all series are batched together. Raises
        :class:`~pacs_ai.errors.NotApplicable` when a series has no image this model can
        take, :class:`~pacs_ai.errors.ImagingError` when a file cannot be read or decoded,
        :class:`~pacs_ai.errors.DecodeLimitExceeded` for absurd dimensions or bombs.
        Safe to call from several threads (calls are serialised per model).
        """
        with self._lock:
            return self._score_series(series, heatmaps)

    def _score_series(self, series: Sequence[Sequence[Path]], heatmaps: bool) -> list[SeriesScore]:
        plans = [self._plan(list(paths)) for paths in series]
        items = [(si, item) for si, plan in enumerate(plans) for item in plan]
        probs: list[np.ndarray] = []
        feats: list[np.ndarray] = []
        inputs: list[np.ndarray] = []
        pending: list[np.ndarray | Decoded] = []
        spec = self.card.input
        on_cpu = self._torch_device.type == "cpu"
        tasks = [
            PrepTask(path, frame, kind, spec.windows if kind == "ct" else (), spec.size, on_cpu)
            for _, (path, frame, kind, _) in items
        ]

        def flush() -> None:
            if on_cpu:
                batch = torch.from_numpy(stack_inputs(pending))  # type: ignore[arg-type]
            else:  # table lookup and letterbox on the GPU
                batch = finish(pending, spec.size, self._torch_device)  # type: ignore[arg-type]
            p, f = self._forward_tensor(batch)
            probs.append(p)
            feats.append(f)
            inputs.extend(batch.cpu().numpy())
            pending.clear()

        depth = 2 * self.batch_size
        for prepared in _prefetch(prepare_task, tasks, depth, self.decode_pool):
            pending.append(prepared)
            if len(pending) == self.batch_size:
                flush()
        if pending:
            flush()
        all_probs = np.concatenate(probs) if probs else np.zeros((0, len(self.card.classes)))
        all_feats = np.concatenate(feats) if feats else np.zeros((0, 0))
        out: list[SeriesScore] = []
        for si, plan in enumerate(plans):
            idx = [i for i, (s, _) in enumerate(items) if s == si]
            score = self._series_score(
                all_probs[idx], [inputs[i] for i in idx], [p[3] for p in plan], heatmaps
            )
            if self.ood is not None and self.card.ood is not None:
                score.ood_score = self.ood.series_score(all_feats[idx])
                score.ood_threshold = self.card.ood.threshold
            out.append(score)
        return out

    def _series_score(
        self, probs: np.ndarray, inputs: list[np.ndarray], uids: list[str], heatmaps: bool
    ) -> SeriesScore:
        series_probs = aggregate(probs, self._finding_idx, self.card.aggregation)
        labels = self.card.classes
        # Reported values are rounded to 3 decimals (SR, summary, audit), and the decision is
        # taken on the rounded values, so no report shows "0.500 >= 0.500: Absent".
        probabilities = {c: round(float(series_probs[i]), 3) for i, c in enumerate(labels)}
        thresholds = {
            f.label: round(float(self.card.thresholds[f.label]), 3) for f in self.card.findings
        }
        present = {k: probabilities[k] >= t for k, t in thresholds.items()}
        best = int(suspicion(probs, self._finding_idx).argmax())
        display = inputs[best][0].copy()
        heat, heat_label = None, None
        if heatmaps and self.card.findings and self._model.cam_layer is not None:
            top = max(thresholds, key=lambda k: probabilities[k])
            heat = self.heatmap(inputs[best], top) * body_mask(display)
            heat_label = next(f.code.meaning for f in self.card.findings if f.label == top)
        return SeriesScore(
            probabilities=probabilities,
            present=present,
            thresholds=thresholds,
            used_instances=list(dict.fromkeys(uids)),
            heatmap=heat,
            display_image=display,
            heatmap_label=heat_label,
        )

    # A plan item: (path, frame or None, kind, SOP Instance UID).
    def _plan(self, paths: list[Path]) -> list[tuple[Path, int | None, str, str]]:
        headers = [read_header(p) for p in paths]
        if self.card.kind == "cxr":
            plan: list[tuple[Path, int | None, str, str]] = [
                (p, None, "cxr", str(h.get("SOPInstanceUID", "")))
                for p, h in zip(paths, headers, strict=True)
                if xray_image_problem(h) is None
            ]
            if not plan:
                raise NotApplicable("no frontal chest X-ray image in the series")
            return plan
        slices = ct_scored_slices(paths, headers, self.card.input)
        if not slices:
            raise NotApplicable("no axial CT slice in the series")
        return [(s.path, s.frame, "ct", s.sop_uid) for s in slices]


# Preprocessing threads when there is no decode pool.
_PREP_WORKERS = min(4, os.cpu_count() or 1)


def _prefetch(
    fn: Callable[[_T], _R], items: Iterable[_T], depth: int, pool: DecodePool | None = None
) -> Iterator[_R]:
    """``map(fn, items)`` computed in the decode processes of ``pool`` (else background
    threads), in order, at most ``depth`` ahead."""
    if pool is not None:
        yield from pool.map(fn, items, depth)
        return
    with ThreadPoolExecutor(
        max_workers=_PREP_WORKERS, thread_name_prefix="pacs-ai-prep"
    ) as threads:
        queue: deque[Future[_R]] = deque()
        source = iter(items)
        for item in source:
            queue.append(threads.submit(fn, item))
            if len(queue) >= depth:
                break
        while queue:
            result = queue.popleft().result()
            nxt = next(source, None)
            if nxt is not None:
                queue.append(threads.submit(fn, nxt))
            yield result


def load_model(
    model_dir: Path,
    device: str = "auto",
    batch_size: int = 16,
    *,
    precision: Precision = "auto",
    warmup: bool = True,
    require_deployable: bool = True,
    bf16_tolerance: float = DEFAULT_BF16_TOLERANCE,
    decode_pool: DecodePool | None = None,
) -> LoadedModel:
    """Load a model directory (``card.json`` + weights, or + a TorchScript / ``torch.export``
    program: :mod:`pacs_ai.inference.program`), offline.

    Raises :class:`~pacs_ai.errors.ModelRefused` for a model that fails the deployment check
    (predictions collapse to one class, AUC not above baseline, no validation metrics) and
    :class:`~pacs_ai.errors.ModelError` when the directory or weights cannot be used.
    ``require_deployable=False`` skips the refusal (``pacs-ai evaluate`` of any model).
    ``precision="auto"`` on the CPU compares bf16 with fp32 here (it warms the model up
    too); see :mod:`pacs_ai.inference.precision`. ``decode_pool``: decode processes to
    preprocess in (:mod:`pacs_ai.inference.decodepool`); None: threads of this process.
    """
    model_dir = Path(model_dir)
    card = load_card(model_dir)
    if require_deployable:
        check_deployable(card)
    if card.format != "builtin":
        from pacs_ai.inference.program import load_program

        model: Classifier = load_program(model_dir, card)
    else:
        model = build_from_card(card)
        state = _load_state(model_dir, card)
        try:
            model.load_state_dict(
                {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            )
        except RuntimeError as exc:
            raise ModelError(f"weights do not fit architecture {card.arch!r}: {exc}") from exc
    loaded = LoadedModel(card, model, select_device(device), batch_size, precision, decode_pool)
    if card.ood is not None:
        loaded.ood = OodDensity.load(model_dir, card.ood)
    if precision == "auto" and loaded.device == "cpu" and not warmup:
        loaded.use_precision(PrecisionChoice(None, "auto: bf16 not measured (no warm-up)"))
    elif precision == "auto" and loaded.device == "cpu":
        loaded.use_precision(
            auto_cpu_precision(
                loaded.predict_as,
                card.input,
                card.input.channels,
                bf16_tolerance,
                card.metrics.get("precision_check"),
            )
        )
    elif warmup:
        loaded.warm_up()
    log.debug("model %s %s loaded on %s", card.name, card.version, loaded.device)
    return loaded
