"""What the scoring worker does with one study, and the plain types it answers with.

:func:`analyse_study` runs inside the worker child process (see
:mod:`pacs_ai.scoring_worker`): it reads the headers, routes and gates each series
(:mod:`pacs_ai.routing`), then decodes, preprocesses and scores the applicable series with
their model, batched per model. Its answer (:class:`StudyAnalysis`) holds only plain Python
and numpy values (no torch), so the listener's process never imports torch.

Outcomes per series: a score, or not applicable with the gating reason. Anything else a
series raises (undecodable pixel data, a bomb, a model error, out of memory) fails the whole
job: that is a fault to retry, never a clinical "not applicable".
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from pacs_ai.codes import Code
from pacs_ai.config import Settings
from pacs_ai.errors import NotApplicable
from pacs_ai.imaging.decode import read_header
from pacs_ai.routing import decide

if TYPE_CHECKING:
    from pacs_ai.inference import LoadedModel
    from pacs_ai.inference.card import ModelCard
    from pacs_ai.inference.decodepool import DecodePool
    from pacs_ai.inference.runner import SeriesScore

log = logging.getLogger(__name__)

# Header elements larger than this are not sent back for reporting (reports copy patient,
# study and equipment attributes; none of those is large).
_MAX_REPORT_VALUE = 64 * 1024
_FIRST_PRIVATE_OR_PIXEL_GROUP = 0x6000


@dataclass(frozen=True)
class SeriesFiles:
    """One series to analyse: its database id, modality (for reasons) and files."""

    series_id: int
    modality: str
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class StudyRequest:
    series: tuple[SeriesFiles, ...]
    heatmaps: bool


@dataclass(frozen=True)
class ModelInfo:
    """What reports and result rows need to know about a model (from its card)."""

    name: str
    version: str
    device: str
    demo: bool
    aggregation: str
    input_size: int
    findings: tuple[tuple[str, Code], ...]  # (label, code) per reportable finding
    kind: str  # "cxr" | "ct" (the card's)
    card: ModelCard  # the validation reference monitoring compares with (plain data)


@dataclass
class Score:
    """A series' score (see :class:`pacs_ai.inference.SeriesScore`), without torch types."""

    probabilities: dict[str, float]
    present: dict[str, bool]
    thresholds: dict[str, float]
    used_instances: list[str]
    heatmap: np.ndarray | None
    display_image: np.ndarray | None
    heatmap_label: str | None = None  # the finding the heatmap is for
    ood_score: float | None = None


@dataclass
class SeriesOutcome:
    """``model`` and ``score`` for a scored series, else ``reason`` it is not applicable.
    ``sources``: report-sized headers of the scored images."""

    series_id: int
    model: str | None = None
    reason: str = ""
    score: Score | None = None
    sources: list[Dataset] = field(default_factory=list)
    refused_by: str | None = None  # the model that refused it as out of distribution
    ood_score: float | None = None


@dataclass
class StudyAnalysis:
    series: list[SeriesOutcome]
    models: dict[str, ModelInfo]
    elapsed_ms: float


class ModelProvider:
    """Loads each configured model once (with warm-up) and hands it out. The models share
    one pool of decode processes (``inference.decode_processes``), started with the first
    model and stopped by :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self._pool: DecodePool | None = None

    def close(self) -> None:
        """Stop the decode processes (the models stay usable, decoding in threads)."""
        with self._lock:
            pool, self._pool = self._pool, None
            for m in self._models.values():
                m.decode_pool = None
        if pool is not None:
            pool.close()

    def _decode_pool(self) -> DecodePool | None:
        from pacs_ai.inference import select_device
        from pacs_ai.inference.decodepool import DecodePool, auto_processes

        inf = self._settings.inference
        gpu = select_device(inf.device).type == "cuda"
        processes = auto_processes(inf.decode_processes, gpu)
        if self._pool is None and processes > 0:
            self._pool = DecodePool(processes, self._settings.pipeline.worker_timeout_seconds)
        return self._pool

    def get(self, key: str) -> LoadedModel:
        from pacs_ai.inference import load_model, resolve_model_dir

        with self._lock:
            if key not in self._models:
                inf = self._settings.inference
                source = inf.cxr_model if key == "cxr" else inf.ct_model
                self._models[key] = load_model(
                    resolve_model_dir(source),
                    device=inf.device,
                    batch_size=inf.batch_size,
                    precision=inf.precision,
                    bf16_tolerance=inf.bf16_tolerance,
                    decode_pool=self._decode_pool(),
                )
                card = self._models[key].card
                log.debug(  # `serve` logs each model in its start-up summary
                    "model %s loaded: %s %s on %s",
                    key,
                    card.name,
                    card.version,
                    self._models[key].device,
                )
            return self._models[key]

    def summary(self, key: str) -> ModelSummary:
        """Load model ``key`` now if needed; what the start-up summary says of it."""
        m = self.get(key)
        c = m.card
        return ModelSummary(
            key, c.name, c.version, c.demo, str(m.device), m.precision, m.precision_reason
        )


@dataclass(frozen=True)
class ModelSummary:
    """A loaded model as the start-up summary names it (plain values: crosses the pipe)."""

    key: str
    name: str
    version: str
    demo: bool
    device: str
    precision: str
    precision_reason: str = ""  # why, for precision "auto" (pacs_ai.inference.precision)


def analyse_study(
    models: ModelProvider, settings: Settings, request: StudyRequest
) -> StudyAnalysis:
    """Route, gate and score every series of one study (see module doc)."""
    t0 = time.perf_counter()
    outcomes: list[SeriesOutcome] = []
    headers: dict[int, list[Dataset]] = {}
    for s in request.series:
        headers[s.series_id] = [read_header(p) for p in s.paths]
        decision = decide(
            settings.routing,
            headers[s.series_id],
            min_ct_slices=settings.inference.min_ct_slices,
            modality=s.modality,
        )
        outcomes.append(SeriesOutcome(s.series_id, decision.model, decision.reason))
    files = {s.series_id: list(s.paths) for s in request.series}
    infos: dict[str, ModelInfo] = {}
    for key in sorted({o.model for o in outcomes if o.model}):
        group = [o for o in outcomes if o.model == key]
        model = models.get(key)
        infos[key] = _model_info(model)
        for outcome, score in _score(model, group, files, request.heatmaps):
            if score.refusal is not None:  # unlike the training data: no finding, no report
                outcome.model, outcome.reason = None, score.refusal
                outcome.refused_by, outcome.ood_score = key, score.ood_score
                continue
            by_uid = {str(h.get("SOPInstanceUID", "")): h for h in headers[outcome.series_id]}
            outcome.score = _plain(score)
            outcome.sources = [_report_header(by_uid[uid]) for uid in score.used_instances]
    return StudyAnalysis(outcomes, infos, (time.perf_counter() - t0) * 1000)


def _score(
    model: LoadedModel,
    group: list[SeriesOutcome],
    files: dict[int, list[Path]],
    heatmaps: bool,
) -> list[tuple[SeriesOutcome, SeriesScore]]:
    """Score all series of one model in one batched call; if a series has no image the model
    can take, score them one by one so only that series is marked not applicable. Every other
    error propagates (the job fails)."""
    try:
        scores = model.score_series([files[o.series_id] for o in group], heatmaps=heatmaps)
        return list(zip(group, scores, strict=True))
    except NotApplicable:
        log.info("a series of the batch is not applicable; scoring one by one")
    results = []
    for o in group:
        try:
            results.append((o, model.score_series([files[o.series_id]], heatmaps=heatmaps)[0]))
        except NotApplicable as exc:
            o.model, o.reason = None, str(exc)[:200]
    return results


def _model_info(model: LoadedModel) -> ModelInfo:
    card = model.card
    return ModelInfo(
        name=card.name,
        version=card.version,
        device=model.device,
        demo=card.demo,
        aggregation=card.aggregation or "none",
        input_size=int(card.input.size),
        findings=tuple((f.label, f.code) for f in card.findings),
        kind=card.kind,
        card=card,
    )


def _plain(score: SeriesScore) -> Score:
    return Score(
        probabilities=dict(score.probabilities),
        present=dict(score.present),
        thresholds=dict(score.thresholds),
        used_instances=list(score.used_instances),
        heatmap=score.heatmap,
        display_image=score.display_image,
        heatmap_label=score.heatmap_label,
        ood_score=score.ood_score,
    )


def _report_header(ds: Dataset) -> Dataset:
    """The public header elements below the overlay/pixel groups, without large values."""
    out = Dataset()
    for elem in ds:
        if elem.tag.group >= _FIRST_PRIVATE_OR_PIXEL_GROUP or elem.tag.is_private:
            continue
        value = elem.value
        size = len(pickle.dumps(value)) if elem.VR == "SQ" else len(str(value))
        if size <= _MAX_REPORT_VALUE:
            out.add(elem)
    if "SpecificCharacterSet" in ds:
        out.SpecificCharacterSet = ds.SpecificCharacterSet
    return out


def describe_input(info: ModelInfo) -> str:
    return f"{info.input_size}x{info.input_size}" if info.input_size else "see model card"
