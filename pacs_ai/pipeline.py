"""The pipeline: ready study -> scoring worker -> reports -> results and outbox.

A pipeline thread claims one ready study at a time from the job ledger
(:mod:`pacs_ai.jobs`), hands its files to the scoring worker child process
(:mod:`pacs_ai.scoring_worker`: routing, gating, decode, preprocess and model run there, under
a memory limit), builds the report objects from the answer, and records everything in one
transaction (:mod:`pacs_ai.results`):

- series that no model applies to get ``not_applicable_reason``; a study with none left is
  ``not_applicable`` and gets no score and no report;
- anything else that goes wrong (undecodable pixel data, a bomb, a model error, the worker
  running out of memory, dying or hanging) fails the job with a scrubbed reason
  (:func:`~pacs_ai.errors.safe_reason`); the study is retried after ``pipeline.retry_seconds``
  and dead-lettered (``failed``) after the last, also across restarts of the service.

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
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from pydicom.dataset import Dataset
from sqlalchemy import Engine, select

from pacs_ai.config import Settings
from pacs_ai.db.models import Instance, Report, Series, utcnow
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.errors import PacsAiError, safe_reason
from pacs_ai.jobs import Claim, DeadLettered, JobLedger, RetryLater, StaleAttempt, Unclaimed
from pacs_ai.logs import uid_ref
from pacs_ai.results import BuiltReport, record_results
from pacs_ai.scoring import (
    SeriesFiles,
    SeriesOutcome,
    StudyAnalysis,
    StudyRequest,
    describe_input,
)
from pacs_ai.scoring_worker import ScoringWorker
from pacs_ai.storage.cache import instance_reader

# highdicom (reporting) takes seconds to import; it is imported on the pipeline thread when it
# first needs it, so `serve` starts listening at once.
if TYPE_CHECKING:
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


class Pipeline:
    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        outbox: Outbox,
        scorer: ScoringWorker | None = None,
        on_reported: Callable[[], None] | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        worker_id: str | None = None,
        name: str = "pipeline",
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._outbox = outbox
        self._scorer = scorer or ScoringWorker(settings)
        self._on_reported = on_reported
        self._clock = clock
        self._read = instance_reader(settings.storage)
        self.worker_id = (worker_id or f"{socket.gethostname()}:{os.getpid()}")[:64]
        self.ledger = JobLedger(engine, settings.pipeline.retry_seconds, self.worker_id, clock)
        self._name = name
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def scorer(self) -> ScoringWorker:
        return self._scorer

    # --- the worker thread -----------------------------------------------------------------

    def start(self) -> None:
        self._scorer.start()
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def wake(self, _study_ids: object = None) -> None:
        self._wake.set()

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
        self._scorer.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                while not self._stop.is_set() and self.run_once():
                    pass
            except Exception as exc:
                log.error("pipeline pass failed (%s); retrying at the next poll", safe_reason(exc))
            self._wake.wait(timeout=self._settings.pipeline.poll_seconds)
            self._wake.clear()

    # --- one study -------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and process one ready study; False when there was none (SQLite: this
        thread's loop; PostgreSQL uses :meth:`run_study` from the queue)."""
        claim = self.ledger.claim()
        if claim is None:
            return False
        self.run_claim(claim)
        return True

    def run_study(self, study_id: int, revision: int) -> None:
        """The queue's task (PostgreSQL): claim this study revision and process it.

        Returns when there is nothing (more) to do for it; raises :class:`RetryLater` (its
        retry is not due, another attempt still holds it, or this attempt failed with
        retries left) or :class:`DeadLettered` (the study is ``failed``), which the queue's
        retry strategy turns into a scheduled retry or a failed job (its dead-letter).
        """
        claim = self.ledger.claim_study(study_id, revision)
        if isinstance(claim, Unclaimed):
            if claim.why == "dead":
                raise DeadLettered(f"study {study_id} revision {revision} is failed")
            if claim.why == "waiting" and claim.retry_at is not None:
                raise RetryLater(f"study {study_id}: retry not due yet", claim.retry_at)
            if claim.why == "processing":
                # A running attempt holds it: this job comes back once that attempt has
                # finished (then "gone") or been declared dead (then due or waiting).
                wait = dt.timedelta(seconds=self._settings.pipeline.heartbeat_seconds)
                raise RetryLater(f"study {study_id}: an attempt is running", self._clock() + wait)
            return  # gone: another revision, finished or deleted
        failure = self.run_claim(claim)
        if failure is None:
            return
        delay = self.ledger.retry_delay(claim.attempt)
        if failure or delay is None:
            raise DeadLettered(f"study {study_id}: attempt {claim.attempt} failed, the last")
        raise RetryLater(
            f"study {study_id}: attempt {claim.attempt} failed",
            self._clock() + dt.timedelta(seconds=delay),
        )

    def run_claim(self, claim: Claim) -> bool | None:
        """Process a claimed study; None when done (or fenced out), else whether the failed
        attempt was the last (dead-lettered)."""
        started = time.perf_counter()
        failed: bool | None = None
        try:
            with _Heartbeat(self.ledger, claim, self._settings.pipeline.heartbeat_seconds):
                self._process(claim)
        except StaleAttempt:
            # Declared dead meanwhile (another worker took the study back): nothing committed.
            log.warning(
                "study %d: stale attempt %d refused at commit; no result recorded",
                claim.study_id,
                claim.attempt,
            )
        except Exception as exc:
            if not isinstance(exc, PacsAiError):
                log.error("study %d: unexpected %s", claim.study_id, type(exc).__name__)
            failed = self.ledger.fail(claim, safe_reason(exc))
        log.info(
            "study %d (rev %d) processed in %.0f ms",
            claim.study_id,
            claim.revision,
            (time.perf_counter() - started) * 1000,
        )
        return failed

    def _process(self, claim: Claim) -> None:
        from pacs_ai.reporting import output

        kinds = output.built_kinds(self._settings)
        request = StudyRequest(
            self._series_files(claim.study_id),
            heatmaps=self._settings.inference.heatmaps and "summary" in kinds,
        )
        analysis = self._scorer.analyse(request)
        built = self._build_reports(claim, analysis, kinds)
        recorded = record_results(
            self._engine,
            self._outbox,
            claim,
            analysis,
            built,
            self._settings,
            {key: self._mode(key) for key in analysis.models},
            self._clock(),
        )
        if recorded is None:
            log.info("study %d changed while processing; results discarded", claim.study_id)
            return
        log.info(
            "study %d (%s): %s, %d report objects, %d deliveries",
            claim.study_id,
            uid_ref(claim.study_uid),
            recorded.state.value,
            recorded.reports,
            recorded.deliveries,
        )
        if recorded.deliveries and self._on_reported is not None:
            self._on_reported()

    def _series_files(self, study_id: int) -> tuple[SeriesFiles, ...]:
        out = []
        with self._engine.connect() as conn:
            for series_id, modality in conn.execute(
                select(Series.id, Series.modality)
                .where(Series.study_id == study_id)
                .order_by(Series.id)
            ):
                # For an instance received twice with different bytes, score the newest copy.
                rows = conn.execute(
                    select(Instance.sop_instance_uid, Instance.sha256, Instance.path)
                    .where(Instance.series_id == series_id, Instance.purged_at.is_(None))
                    .order_by(Instance.id)
                ).all()
                if not rows:
                    continue  # every file of this series was purged by retention
                latest = {uid: (sha, path) for uid, sha, path in rows}
                # The spool file, or (storage.backend = "s3") the object through the cache.
                paths = tuple(self._read(sha, p) for sha, p in latest.values())
                out.append(SeriesFiles(series_id, modality or "", paths))
        return tuple(out)

    # --- reports ---------------------------------------------------------------------------

    def _mode(self, key: str) -> str:
        """``shadow``: findings, reports and monitoring recorded, nothing delivered."""
        inf = self._settings.inference
        return inf.cxr_mode if key == "cxr" else inf.ct_mode

    def _build_reports(
        self, claim: Claim, analysis: StudyAnalysis, kinds: list[str]
    ) -> list[BuiltReport]:
        from pacs_ai.reporting import output

        reports_dir = output.study_folder(
            self._settings.reports.path, self._clock(), claim.study_id
        )
        built: list[BuiltReport] = []
        for key in sorted(analysis.models):
            results = [s for s in analysis.series if s.model == key and s.score is not None]
            if not results:
                continue
            req = self._report_request(claim, analysis, key, results)
            for kind in kinds:
                ds = _builder(kind)(self._with_predecessor(claim, kind, req))
                path = output.write_outputs(self._settings, reports_dir, kind, claim.revision, ds)
                if path is not None:
                    built.append(BuiltReport(kind, ds, path, deliver=self._mode(key) == "active"))
        return built

    def _report_request(
        self, claim: Claim, analysis: StudyAnalysis, key: str, results: list[SeriesOutcome]
    ) -> ReportRequest:
        from pacs_ai.reporting import AlgorithmInfo, FindingResult, ReportRequest

        info = analysis.models[key]
        scores = [s.score for s in results if s.score is not None]
        findings = []
        for label, code in info.findings:
            prob = max(score.probabilities[label] for score in scores)
            threshold = scores[0].thresholds[label]
            findings.append(
                FindingResult(
                    label=label,
                    code=code,
                    probability=prob,
                    threshold=threshold,
                    present=prob >= threshold,
                )
            )
        top = findings[0].label if findings else None
        best = max(scores, key=lambda sc: sc.probabilities.get(top, 0.0) if top else 0.0)
        sources = [h for s in results for h in s.sources]
        parameters = {f"threshold {f.label}": f"{f.threshold:.3f}" for f in findings}
        parameters["input"] = describe_input(info)
        if info.kind == "ct" and info.aggregation != "none":
            parameters["slice aggregation"] = info.aggregation
        return ReportRequest(
            sources=sources,
            findings=findings,
            algorithm=AlgorithmInfo(info.name, info.version, MANUFACTURER, info.demo, parameters),
            study_revision=claim.revision,
            display_image=best.display_image,
            heatmap=best.heatmap,
            heatmap_label=best.heatmap_label,
        )

    def _with_predecessor(self, claim: Claim, kind: str, req: ReportRequest) -> ReportRequest:
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


class _Heartbeat:
    """While an attempt runs: refresh its heartbeat every ``interval`` seconds on a thread
    (the scoring child may take minutes; the heartbeat says this worker is alive)."""

    def __init__(self, ledger: JobLedger, claim: Claim, interval: float) -> None:
        self._ledger, self._claim, self._interval = ledger, claim, interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        warned = False
        while not self._done.wait(self._interval):
            try:
                alive = self._ledger.heartbeat(self._claim)
            except Exception as exc:  # database away: try again; the sweep decides
                log.warning("heartbeat failed (%s)", safe_reason(exc))
                continue
            if not alive and not warned:
                warned = True
                log.warning(
                    "study %d: attempt %d was taken back as stalled; its result will be refused",
                    self._claim.study_id,
                    self._claim.attempt,
                )
