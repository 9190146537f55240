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
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("heartbeat_at", pacs_ai.db.models.UTCDateTime(timezone=True), nullable=True)
        )
    # Partial unique indexes (PostgreSQL and SQLite both have them). An attempt left running
    # by an older version beside another running one of the same revision would block the
    # index: such duplicates cannot exist (claims were already exclusive), so none is fixed up.
    for name, state in (("uq_jobs_one_running", "running"), ("uq_jobs_one_succeeded", "succeeded")):
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
