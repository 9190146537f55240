"""The pipeline worker: ready study -> routing and gating -> scores -> report -> outbox.

A worker claims one ready study at a time (PostgreSQL: ``FOR UPDATE SKIP LOCKED``, so
several workers on one database never take the same study; SQLite: an atomic conditional
update, one worker). Every step is recorded before the next starts:

- series that no model applies to get ``not_applicable_reason``; a study with none left is
  ``not_applicable`` and gets no score and no report;
- a failing model (error, out of memory) fails the job with its reason; the study is retried
  after ``pipeline.retry_seconds`` and dead-lettered (``failed``) after the last;
- results (jobs, findings), report objects and their deliveries are written in one
  transaction, and only if the study's revision is still the one that was scored (a late
  instance meanwhile means the study is re-run instead).

Study-level aggregation when several series of one study are scored by the same model: per
finding, the highest probability over the series (the conservative reading); the summary
image shows the series with the highest probability.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import Connection, Engine, and_, exists, func, insert, select, update

from pacs_ai.config import RoutingRule, Settings
from pacs_ai.db.models import (
    Finding,
    Instance,
    Job,
    JobState,
    Report,
    Series,
    Study,
    StudyState,
    utcnow,
)
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.errors import ImagingError, NotApplicable, PacsAiError
from pacs_ai.imaging.gating import assess_series
from pacs_ai.ingest.recorder import write_audit
from pacs_ai.ingest.spool import Spool
from pacs_ai.logs import uid_ref

# torch (inference) and highdicom (reporting) take seconds to import; they are imported on the
# pipeline thread when it first needs them, so `serve` starts listening at once.
if TYPE_CHECKING:
    from pacs_ai.inference import LoadedModel, SeriesScore
    from pacs_ai.reporting import ReportRequest

log = logging.getLogger(__name__)

MANUFACTURER = "pacs-ai project"


def _builder(kind: str) -> Callable[[ReportRequest], Dataset]:
    from pacs_ai import reporting

    builders: dict[str, Callable[[ReportRequest], Dataset]] = {
        "sr": reporting.build_sr,
        "summary": reporting.build_summary_image,
        "text_sr": reporting.build_text_sr,
    }
    return builders[kind]


class ModelProvider:
    """Loads each configured model once (with warm-up) and hands it out."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

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
                )
                card = self._models[key].card
                log.info(
                    "model %s loaded: %s %s on %s",
                    key,
                    card.name,
                    card.version,
                    self._models[key].device,
                )
            return self._models[key]

    def preload(self) -> None:
        for key in ("cxr", "ct"):
            try:
                self.get(key)
            except PacsAiError as exc:
                log.error("model %s cannot be loaded: %s", key, exc)


@dataclass
class _SeriesInput:
    series_id: int
    modality: str
    headers: list[Dataset]
    paths: list[Path]
    model: str | None = None
    reason: str = ""
    refused_by: str | None = None  # the model that refused it as out of distribution
    ood_score: float | None = None


@dataclass
class _Claim:
    study_id: int
    study_uid: str
    revision: int
    job_id: int
    attempt: int
    started: dt.datetime
    series: list[_SeriesInput] = field(default_factory=list)


def route(rules: Sequence[RoutingRule], headers: Sequence[Dataset]) -> RoutingRule | None:
    """The first rule whose filters all match the series (judged on its first image)."""
    first = headers[0]
    modality = str(first.get("Modality", "")).upper()
    sop_class = str(first.get("SOPClassUID", ""))
    body_part = str(first.get("BodyPartExamined", "") or "").upper()
    image_type = {str(v).upper() for v in (first.get("ImageType") or [])}
    for rule in rules:
        if rule.modalities and modality not in rule.modalities:
            continue
        if rule.sop_classes and sop_class not in rule.sop_classes:
            continue
        if rule.body_parts and body_part not in {b.upper() for b in rule.body_parts}:
            continue
        if image_type & {t.upper() for t in rule.exclude_image_types}:
            continue
        return rule
    return None


class Pipeline:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        outbox: Outbox,
        models: ModelProvider,
        on_reported: Callable[[], None] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        worker_id: str | None = None,
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._outbox = outbox
        self._models = models
        self._on_reported = on_reported
        self._clock = clock
        self._spool = Spool(settings.storage.path, 0)
        self.worker_id = (worker_id or f"{socket.gethostname()}:{os.getpid()}")[:64]
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the worker thread -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="pipeline", daemon=True)
        self._thread.start()

    def wake(self, _study_ids: object = None) -> None:
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        self._models.preload()
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and self.run_once():
                    pass
            except Exception:
                log.exception("pipeline pass failed; retrying at the next poll")
            self._wake.wait(timeout=self._settings.pipeline.poll_seconds)
            self._wake.clear()

    # --- one study -------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and process one ready study; False when there was none."""
        claim = self._claim()
        if claim is None:
            return False
        started = time.perf_counter()
        try:
            self._process(claim)
        except Exception as exc:
            self._fail(claim, exc)
        log.info(
            "study %d (rev %d) processed in %.0f ms",
            claim.study_id,
            claim.revision,
            (time.perf_counter() - started) * 1000,
        )
        return True

    def _claim(self) -> _Claim | None:
        now = self._clock()
        with self._engine.begin() as conn:
            waiting = exists().where(
                and_(
                    Job.study_id == Study.id,
                    Job.study_revision == Study.revision,
                    Job.state == JobState.FAILED,
                    Job.next_attempt_at > now,
                )
            )
            q = (
                select(Study.id, Study.study_uid, Study.revision)
                .where(Study.state == StudyState.READY, ~waiting)
                .order_by(Study.ready_at, Study.id)
                .limit(1)
            )
            if conn.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True, of=Study)
            row = conn.execute(q).first()
            if row is None:
                return None
            taken = conn.execute(
                update(Study)
                .where(
                    Study.id == row.id,
                    Study.state == StudyState.READY,
                    Study.revision == row.revision,
                )
                .values(state=StudyState.PROCESSING, state_changed_at=now)
                .returning(Study.id)
            ).first()
            if taken is None:
                return None  # another worker or a late instance got there first
            attempt = 1 + int(
                conn.scalar(
                    select(func.count()).where(
                        Job.study_id == row.id, Job.study_revision == row.revision
                    )
                )
                or 0
            )
            job_id = conn.execute(
                insert(Job)
                .values(
                    study_id=row.id,
                    study_revision=row.revision,
                    attempt=attempt,
                    state=JobState.RUNNING,
                    claimed_by=self.worker_id,
                    started_at=now,
                )
                .returning(Job.id)
            ).scalar_one()
            claim = _Claim(row.id, row.study_uid, row.revision, job_id, attempt, now)
            claim.series = self._load_series(conn, row.id)
        return claim

    def recover_stale(self, older_than: dt.timedelta) -> int:
        """Studies left ``processing`` by a worker that died: back to ``ready``.

        With SQLite (one worker) the service calls this at start with no age limit; with
        PostgreSQL only jobs running longer than ``pipeline.lease_seconds`` are taken back.
        """
        now = self._clock()
        with self._engine.begin() as conn:
            stale = conn.execute(
                select(Job.id, Job.study_id).where(
                    Job.state == JobState.RUNNING, Job.started_at <= now - older_than
                )
            ).all()
            for job_id, study_id in stale:
                conn.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .values(
                        state=JobState.FAILED,
                        finished_at=now,
                        next_attempt_at=now,
                        error="interrupted (worker stopped)",
                    )
                )
                conn.execute(
                    update(Study)
                    .where(Study.id == study_id, Study.state == StudyState.PROCESSING)
                    .values(
                        state=StudyState.READY,
                        state_changed_at=now,
                        state_reason="re-queued after an interrupted job",
                    )
                )
                write_audit(conn, "system", "job_interrupted", "warning", "study", study_id)
        return len(stale)

    def _load_series(self, conn: Connection, study_id: int) -> list[_SeriesInput]:
        out = []
        for series_id, modality in conn.execute(
            select(Series.id, Series.modality)
            .where(Series.study_id == study_id)
            .order_by(Series.id)
        ):
            # For an instance received twice with different bytes, score the newest copy.
            rows = conn.execute(
                select(Instance.sop_instance_uid, Instance.path)
                .where(Instance.series_id == series_id)
                .order_by(Instance.id)
            ).all()
            latest = {uid: path for uid, path in rows}
            paths = [self._spool.resolve(p) for p in latest.values()]
            out.append(_SeriesInput(series_id, modality or "", [], paths))
        return out

    def _process(self, claim: _Claim) -> None:
        settings = self._settings
        t0 = time.perf_counter()
        for s in claim.series:
            s.headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in s.paths]
            rule = route(settings.routing, s.headers)
            if rule is None:
                s.reason = f"no routing rule for {s.modality or 'unknown modality'}"
                continue
            gate = assess_series(s.headers, min_ct_slices=settings.inference.min_ct_slices)
            if not gate.applicable or gate.kind != rule.model:
                s.reason = gate.reason if not gate.applicable else f"not a {rule.model} series"
                continue
            s.model = rule.model
        applicable = [s for s in claim.series if s.model]
        scores: dict[str, list[tuple[_SeriesInput, SeriesScore]]] = {}
        model_info: dict[str, LoadedModel] = {}
        for key in sorted({s.model for s in applicable if s.model}):
            group = [s for s in applicable if s.model == key]
            model = self._models.get(key)
            model_info[key] = model
            results = self._score(model, group)
            results = [(s, score) for s, score in results if not _refuse(s, score, key)]
            if results:
                scores[key] = results
        self._record(claim, scores, model_info, (time.perf_counter() - t0) * 1000)

    @staticmethod
    def _score(
        model: LoadedModel, group: list[_SeriesInput]
    ) -> list[tuple[_SeriesInput, SeriesScore]]:
        """Score all series of one model in one batched call; if one series cannot be read,
        score them one by one so only that series is marked not applicable."""
        try:
            return list(zip(group, model.score_series([s.paths for s in group]), strict=True))
        except (ImagingError, NotApplicable):
            log.info("a series of the batch could not be scored; scoring one by one")
        results = []
        for s in group:
            try:
                results.append((s, model.score_series([s.paths])[0]))
            except (ImagingError, NotApplicable) as exc:
                s.model, s.reason = None, f"cannot score: {exc}"[:200]
        return results

    # --- recording -------------------------------------------------------------------------

    def _record(
        self,
        claim: _Claim,
        scores: dict[str, list[tuple[_SeriesInput, SeriesScore]]],
        models: dict[str, LoadedModel],
        elapsed_ms: float,
    ) -> None:
        now = self._clock()
        requests = [self._report_request(claim, models[k], r) for k, r in scores.items()]
        from pacs_ai.reporting import write_object

        kinds = self._object_kinds()
        reports_dir = self._settings.reports.path / f"study-{claim.study_id}"
        built: list[tuple[str, Dataset, Path]] = []  # kind, dataset, file
        shadow: set[str] = set()  # SOP Instance UIDs of shadow-mode reports: not delivered
        for key, req in zip(scores, requests, strict=True):
            for kind in kinds:
                ds = _builder(kind)(self._with_predecessor(claim, kind, req))
                built.append((kind, ds, write_object(ds, reports_dir)))
                if self._mode(key) == "shadow":
                    shadow.add(str(ds.SOPInstanceUID))

        with self._engine.begin() as conn:
            current = conn.execute(
                select(Study.revision, Study.state).where(Study.id == claim.study_id)
            ).one()
            if current.revision != claim.revision or current.state != StudyState.PROCESSING:
                conn.execute(
                    update(Job)
                    .where(Job.id == claim.job_id)
                    .values(
                        state=JobState.FAILED,
                        finished_at=now,
                        next_attempt_at=now,
                        error="superseded: the study changed while it was processed",
                    )
                )
                log.info("study %d changed while processing; results discarded", claim.study_id)
                return
            for s in claim.series:
                conn.execute(
                    update(Series)
                    .where(Series.id == s.series_id)
                    .values(not_applicable_reason=None if s.model else (s.reason[:200] or None))
                )
            for key, results in scores.items():
                card = models[key].card
                for s, score in results:
                    for f in card.findings:
                        conn.execute(
                            insert(Finding).values(
                                job_id=claim.job_id,
                                series_id=s.series_id,
                                model_name=card.name,
                                model_version=card.version,
                                label=f.label,
                                probability=score.probabilities[f.label],
                                threshold=score.thresholds[f.label],
                                present=score.present[f.label],
                            )
                        )
            for key, model in models.items():
                self._observe(conn, claim, key, model, scores.get(key, []))
            conn.execute(
                update(Job)
                .where(Job.id == claim.job_id)
                .values(
                    state=JobState.SUCCEEDED,
                    finished_at=now,
                    duration_ms=elapsed_ms,
                    models="; ".join(f"{m.card.name} {m.card.version}" for m in models.values())
                    or None,
                    device=", ".join(sorted({str(m.device) for m in models.values()})) or None,
                )
            )
            new_reports: list[tuple[int, str]] = []
            to_deliver: list[tuple[int, str]] = []
            for kind, ds, path in built:
                rid = conn.execute(
                    insert(Report)
                    .values(
                        study_id=claim.study_id,
                        job_id=claim.job_id,
                        study_revision=claim.revision,
                        kind=kind,
                        sop_instance_uid=str(ds.SOPInstanceUID),
                        series_instance_uid=str(ds.SeriesInstanceUID),
                        sop_class_uid=str(ds.SOPClassUID),
                        path=str(path.relative_to(self._settings.reports.path)),
                        created_at=now,
                    )
                    .returning(Report.id)
                ).scalar_one()
                new_reports.append((rid, kind))
                if str(ds.SOPInstanceUID) not in shadow:
                    to_deliver.append((rid, kind))
            if not scores:
                reasons = "; ".join(sorted({s.reason for s in claim.series if s.reason}))
                state, reason = StudyState.NOT_APPLICABLE, reasons[:200] or "nothing to score"
            else:
                state, reason = StudyState.REPORTED, None
                if shadow and len(to_deliver) < len(new_reports):
                    reason = "shadow mode: recorded, not delivered"
            queued = self._outbox.enqueue(conn, claim.study_id, to_deliver)
            conn.execute(
                update(Study)
                .where(Study.id == claim.study_id)
                .values(state=state, state_reason=reason, state_changed_at=now)
            )
            write_audit(
                conn,
                "system",
                "study_processed",
                "ok",
                "study",
                claim.study_id,
                {"state": state.value, "reports": len(new_reports), "deliveries": queued},
            )
        log.info(
            "study %d (%s): %s, %d report objects, %d deliveries",
            claim.study_id,
            uid_ref(claim.study_uid),
            state.value,
            len(built),
            queued,
        )
        if queued and self._on_reported is not None:
            self._on_reported()

    def _mode(self, key: str) -> str:
        inf = self._settings.inference
        return inf.cxr_mode if key == "cxr" else inf.ct_mode

    def _observe(
        self,
        conn: Connection,
        claim: _Claim,
        key: str,
        model: LoadedModel,
        results: list[tuple[_SeriesInput, SeriesScore]],
    ) -> None:
        """Monitoring (pacs_ai.monitoring): what the model said, refusals included."""
        from pacs_ai import monitoring

        scored = [
            monitoring.Scored(score.probabilities, score.present, score.ood_score)
            for _, score in results
        ]
        refused = [s.ood_score for s in claim.series if s.refused_by == key]
        monitoring.observe(
            conn,
            self._settings.monitoring,
            model.card,
            self._mode(key),
            claim.study_id,
            scored,
            refused,
            self._clock(),
        )

    def _object_kinds(self) -> list[str]:
        kinds = {"sr"}
        for dest in self._settings.destinations:
            kinds.update(dest.objects)
        return [k for k in ("sr", "summary", "text_sr") if k in kinds]

    def _report_request(
        self, claim: _Claim, model: LoadedModel, results: list[tuple[_SeriesInput, SeriesScore]]
    ) -> ReportRequest:
        from pacs_ai.reporting import AlgorithmInfo, FindingResult, ReportRequest

        card = model.card
        findings = []
        for f in card.findings:
            prob = max(score.probabilities[f.label] for _, score in results)
            threshold = next(iter(results))[1].thresholds[f.label]
            findings.append(
                FindingResult(
                    label=f.label,
                    code=f.code,
                    probability=prob,
                    threshold=threshold,
                    present=prob >= threshold,
                )
            )
        top = findings[0].label if findings else None
        best = max(results, key=lambda r: r[1].probabilities.get(top, 0.0) if top else 0.0)[1]
        headers = {str(h.SOPInstanceUID): h for s, _ in results for h in s.headers}
        sources = [headers[uid] for _, score in results for uid in score.used_instances]
        parameters = {f"threshold {f.label}": f"{f.threshold:.3f}" for f in findings}
        parameters["input"] = _describe_input(card)
        if card.kind == "ct" and card.aggregation and card.aggregation != "none":
            parameters["slice aggregation"] = card.aggregation
        return ReportRequest(
            sources=sources,
            findings=findings,
            algorithm=AlgorithmInfo(card.name, card.version, MANUFACTURER, card.demo, parameters),
            study_revision=claim.revision,
            display_image=best.display_image,
            heatmap=best.heatmap,
            heatmap_label=best.heatmap_label,
        )

    def _with_predecessor(self, claim: _Claim, kind: str, req: ReportRequest) -> ReportRequest:
        if claim.revision == 0:
            return req
        with self._engine.connect() as conn:
            prior = conn.execute(
                select(Report.series_instance_uid, Report.sop_class_uid, Report.sop_instance_uid)
                .where(
                    Report.study_id == claim.study_id,
                    Report.kind == kind,
                    Report.study_revision < claim.revision,
                )
                .order_by(Report.study_revision.desc(), Report.id.desc())
                .limit(1)
            ).first()
        if prior is None:
            return req
        from pacs_ai.reporting import PriorReport

        return replace(req, predecessor=PriorReport(claim.study_uid, *prior))

    def _fail(self, claim: _Claim, exc: BaseException) -> None:
        retries = self._settings.pipeline.retry_seconds
        dead = claim.attempt > len(retries)
        now = self._clock()
        reason = f"{exc.__class__.__name__}: {exc}"[:2000]
        log.error(
            "study %d: attempt %d failed (%s)%s",
            claim.study_id,
            claim.attempt,
            exc.__class__.__name__,
            "; dead-lettered" if dead else "; will retry",
            exc_info=not isinstance(exc, PacsAiError),
        )
        retry_at = None if dead else now + dt.timedelta(seconds=retries[claim.attempt - 1])
        with self._engine.begin() as conn:
            conn.execute(
                update(Job)
                .where(Job.id == claim.job_id)
                .values(
                    state=JobState.DEAD if dead else JobState.FAILED,
                    finished_at=now,
                    duration_ms=(now - claim.started).total_seconds() * 1000,
                    error=reason,
                    next_attempt_at=retry_at,
                )
            )
            conn.execute(
                update(Study)
                .where(
                    Study.id == claim.study_id,
                    Study.revision == claim.revision,
                    Study.state == StudyState.PROCESSING,
                )
                .values(
                    state=StudyState.FAILED if dead else StudyState.READY,
                    state_reason=reason[:200],
                    state_changed_at=now,
                )
            )
            write_audit(
                conn,
                "system",
                "job_dead" if dead else "job_failed",
                "error",
                "study",
                claim.study_id,
                {"attempt": claim.attempt, "error": reason[:500]},
            )


def _refuse(s: _SeriesInput, score: SeriesScore, key: str) -> bool:
    """A series unlike the model's training data is not applicable (no finding, no report)."""
    if score.refusal is None:
        return False
    s.model, s.reason, s.refused_by, s.ood_score = None, score.refusal, key, score.ood_score
    return True


def _describe_input(card: object) -> str:
    spec = getattr(card, "input", None)
    size = getattr(spec, "size", None)
    return f"{size}x{size}" if size else "see model card"
