"""instances.uploaded_at and reports.uploaded_at: the S3 uploaders' queues

Revision ID: s3
Revises: queue
Create Date: 2026-12-02

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pacs_ai.db.models

revision: str = "s3"
down_revision: str | Sequence[str] | None = "queue"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_TABLES = ("instances", "reports")


def upgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column(
                    "uploaded_at", pacs_ai.db.models.UTCDateTime(timezone=True), nullable=True
                )
            )
            batch_op.create_index(batch_op.f(f"ix_{table}_uploaded_at"), ["uploaded_at"])


def downgrade() -> None:
    for table in _TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{table}_uploaded_at"))
            batch_op.drop_column("uploaded_at")
