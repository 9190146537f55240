"""Result persistence: findings, report objects, deliveries and the study's new state, in one
transaction, and only if the study is still the revision that was scored (a late instance
meanwhile means the study is re-run instead and these results are discarded)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import Engine, insert, select, update

from pacs_ai.db.events import write_audit
from pacs_ai.db.models import Finding, JobState, Report, Series, Study, StudyState
from pacs_ai.delivery.outbox import Outbox
from pacs_ai.jobs import Claim, finish_job
from pacs_ai.scoring import StudyAnalysis


@dataclass(frozen=True)
class BuiltReport:
    kind: str  # sr | summary | text_sr
    dataset: Dataset
    path: Path  # the written file


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
    reports_root: Path,
    now: dt.datetime,
) -> Recorded | None:
    """Persist one successful job; None when the study changed meanwhile (job superseded)."""
    with engine.begin() as conn:
        current = conn.execute(
            select(Study.revision, Study.state).where(Study.id == claim.study_id)
        ).one()
        if current.revision != claim.revision or current.state != StudyState.PROCESSING:
            finish_job(
                conn,
                claim.job_id,
                JobState.FAILED,
                now,
                next_attempt_at=now,
                error="superseded: the study changed while it was processed",
            )
            return None
        for s in analysis.series:
            conn.execute(
                update(Series)
                .where(Series.id == s.series_id)
                .values(not_applicable_reason=None if s.model else (s.reason[:200] or None))
            )
        scored = [s for s in analysis.series if s.model and s.score is not None]
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
        used = [analysis.models[k] for k in sorted({s.model for s in scored if s.model})]
        finish_job(
            conn,
            claim.job_id,
            JobState.SUCCEEDED,
            now,
            duration_ms=analysis.elapsed_ms,
            models="; ".join(f"{m.name} {m.version}" for m in used) or None,
            device=", ".join(sorted({m.device for m in used})) or None,
        )
        new_reports: list[tuple[int, str]] = []
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
                    path=str(report.path.relative_to(reports_root)),
                    created_at=now,
                )
                .returning(Report.id)
            ).scalar_one()
            new_reports.append((rid, report.kind))
        if not scored:
            reasons = "; ".join(sorted({s.reason for s in analysis.series if s.reason}))
            state, reason = StudyState.NOT_APPLICABLE, reasons[:200] or "nothing to score"
        else:
            state, reason = StudyState.REPORTED, None
        queued = outbox.enqueue(conn, claim.study_id, new_reports)
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
