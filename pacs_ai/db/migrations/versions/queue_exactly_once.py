"""queue: job heartbeats, one running and one succeeded attempt per study revision

Revision ID: queue
Revises: honesty
Create Date: 2026-12-02

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pacs_ai.db.models

revision: str = "queue"
down_revision: str | Sequence[str] | None = "honesty"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Partial unique indexes (PostgreSQL and SQLite both have them) below. Claims were already
    # exclusive, but before fencing a worker whose lease had expired could record a second
    # result without a report (not applicable) for a study revision. Such rows are audit
    # history and are not rewritten here: the upgrade stops first (SQLite DDL is not rolled
    # back) and says how to find them.
    states = (("uq_jobs_one_running", "running"), ("uq_jobs_one_succeeded", "succeeded"))
    for _name, state in states:
        dup = op.get_bind().execute(
            sa.text(
                "SELECT count(*) FROM (SELECT study_id, study_revision FROM jobs "
                f"WHERE state = '{state}' GROUP BY study_id, study_revision "
                "HAVING count(*) > 1) AS d"
            )
        ).scalar()
        if dup:
            raise RuntimeError(
                f"{dup} study revision(s) have more than one {state} job; list them with "
                f"SELECT study_id, study_revision, id FROM jobs WHERE state = '{state}' and "
                "mark all but the first 'failed' before upgrading"
            )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("heartbeat_at", pacs_ai.db.models.UTCDateTime(timezone=True), nullable=True)
        )
    for name, state in states:
        op.create_index(
            name,
            "jobs",
            ["study_id", "study_revision"],
            unique=True,
            sqlite_where=sa.text(f"state = '{state}'"),
            postgresql_where=sa.text(f"state = '{state}'"),
        )


def downgrade() -> None:
    op.drop_index("uq_jobs_one_succeeded", table_name="jobs")
    op.drop_index("uq_jobs_one_running", table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("heartbeat_at")
