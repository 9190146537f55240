"""instances.uploaded_at: the S3 uploader's queue

Revision ID: s3
Revises: honesty
Create Date: 2026-12-02

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pacs_ai.db.models

revision: str = "s3"
down_revision: str | Sequence[str] | None = "honesty"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("uploaded_at", pacs_ai.db.models.UTCDateTime(timezone=True), nullable=True)
        )
        batch_op.create_index(batch_op.f("ix_instances_uploaded_at"), ["uploaded_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_uploaded_at"))
        batch_op.drop_column("uploaded_at")
