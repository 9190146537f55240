"""model monitoring: observations window and alerts

Revision ID: honesty
Revises: web
Create Date: 2026-12-02

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import pacs_ai.db.models

revision: str = "honesty"
down_revision: str | Sequence[str] | None = "web"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_observations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", pacs_ai.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("mode", sa.String(length=8), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("present", sa.Boolean(), nullable=True),
        sa.Column("refused", sa.Boolean(), nullable=False),
        sa.Column("ood_score", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_model_observations_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_observations")),
    )
    with op.batch_alter_table("model_observations", schema=None) as batch_op:
        batch_op.create_index(
            "ix_model_observations_model_label", ["model_name", "label", "id"], unique=False
        )
    op.create_table(
        "model_alerts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("reference", sa.Float(), nullable=True),
        sa.Column("detail", sa.String(length=300), nullable=False),
        sa.Column("raised_at", pacs_ai.db.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("cleared_at", pacs_ai.db.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_alerts")),
    )
    with op.batch_alter_table("model_alerts", schema=None) as batch_op:
        batch_op.create_index("ix_model_alerts_open", ["model_name", "cleared_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("model_alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_model_alerts_open")
    op.drop_table("model_alerts")
    with op.batch_alter_table("model_observations", schema=None) as batch_op:
        batch_op.drop_index("ix_model_observations_model_label")
    op.drop_table("model_observations")
