"""Result persistence: findings, report objects, deliveries and the study's new state, in one
transaction, and only if the study is still the revision that was scored (a late instance
meanwhile means the study is re-run instead and these results are discarded) and the attempt
is still the running one (fencing: an attempt declared dead that comes back late raises
:class:`~pacs_ai.jobs.StaleAttempt` and commits nothing: no finding, report or outbox row)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import Connection, Engine, insert, select, update

from pacs_ai.config import Settings
from pacs_ai.db.events import write_audit
from pacs_ai.db.models import Finding, JobState, Report, Series, Study, StudyState
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.jobs import Claim, StaleAttempt, finish_job
from pacs_ai.scoring import StudyAnalysis


@dataclass(frozen=True)
class BuiltReport:
    kind: str  # sr | summary | text_sr
    dataset: Dataset
    path: Path  # the written file
    deliver: bool = True  # False for a shadow-mode model's reports


@dataclass(frozen=True)
class Recorded:
    state: StudyState
    reports: int
    deliveries: int


def record_results(
    engine: Engine,
    outbox: Outbox,
    claim: Claim,
    analysis: StudyAnalysis,
    built: list[BuiltReport],
    settings: Settings,
    modes: dict[str, str],
    now: dt.datetime,
) -> Recorded | None:
    """Persist one successful job; None when the study changed meanwhile (job superseded)."""
    with engine.begin() as conn:
        current = conn.execute(
            select(Study.revision, Study.state).where(Study.id == claim.study_id)
        ).one()
        if current.revision != claim.revision or current.state != StudyState.PROCESSING:
            if not finish_job(
                conn,
                claim.job_id,
                JobState.FAILED,
                now,
                next_attempt_at=now,
                error="superseded: the study changed while it was processed",
            ):
                raise _stale(claim)
            return None
        scored = [s for s in analysis.series if s.model and s.score is not None]
        used = [analysis.models[k] for k in sorted({s.model for s in scored if s.model})]
        # The fence, first: the job row is locked (PostgreSQL) until commit, so a concurrent
        # stalled-job sweep waits for this and then finds it finished, or wins and this fails.
        if not finish_job(
            conn,
            claim.job_id,
            JobState.SUCCEEDED,
            now,
            duration_ms=analysis.elapsed_ms,
            models="; ".join(f"{m.name} {m.version}" for m in used) or None,
            device=", ".join(sorted({m.device for m in used})) or None,
        ):
            raise _stale(claim)
        for s in analysis.series:
            conn.execute(
                update(Series)
                .where(Series.id == s.series_id)
                .values(not_applicable_reason=None if s.model else (s.reason[:200] or None))
            )
        for s in scored:
            assert s.model is not None and s.score is not None
            info = analysis.models[s.model]
            for label, _code in info.findings:
                conn.execute(
                    insert(Finding).values(
                        job_id=claim.job_id,
                        series_id=s.series_id,
                        model_name=info.name,
                        model_version=info.version,
                        label=label,
                        probability=s.score.probabilities[label],
                        threshold=s.score.thresholds[label],
                        present=s.score.present[label],
                    )
                )
        _observe(conn, settings, modes, claim, analysis, now)
        new_reports: list[tuple[int, str]] = []
        to_deliver: list[tuple[int, str]] = []
        for report in built:
            ds = report.dataset
            rid = conn.execute(
                insert(Report)
                .values(
                    study_id=claim.study_id,
                    job_id=claim.job_id,
                    study_revision=claim.revision,
                    kind=report.kind,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    path=str(report.path.relative_to(settings.reports.path)),
                    created_at=now,
                )
                .returning(Report.id)
            ).scalar_one()
            new_reports.append((rid, report.kind))
            if report.deliver:
                to_deliver.append((rid, report.kind))
        if not scored:
            reasons = "; ".join(sorted({s.reason for s in analysis.series if s.reason}))
            state, reason = StudyState.NOT_APPLICABLE, reasons[:200] or "nothing to score"
        else:
            state, reason = StudyState.REPORTED, None
            if len(to_deliver) < len(new_reports):
                reason = "shadow mode: recorded, not delivered"
        queued = outbox.enqueue(conn, claim.study_id, to_deliver)
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
    return Recorded(state, len(new_reports), queued)


def _stale(claim: Claim) -> StaleAttempt:
    return StaleAttempt(
        f"stale attempt: study {claim.study_id} attempt {claim.attempt} is no longer running"
    )


def _observe(
    conn: Connection,
    settings: Settings,
    modes: dict[str, str],
    claim: Claim,
    analysis: StudyAnalysis,
    now: dt.datetime,
) -> None:
    """Monitoring (:mod:`pacs_ai.monitoring`): what each model said, refusals included."""
    from pacs_ai import monitoring

    for key, info in analysis.models.items():
        scored = [
            monitoring.Scored(s.score.probabilities, s.score.present, s.score.ood_score)
            for s in analysis.series
            if s.model == key and s.score is not None
        ]
        refused = [s.ood_score for s in analysis.series if s.refused_by == key]
        monitoring.observe(
            conn, settings.monitoring, info.card, modes[key], claim.study_id, scored, refused, now
        )
