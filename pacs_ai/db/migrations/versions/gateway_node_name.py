"""associations.gateway and instances.gateway: which gateway (service.node_name) received them

Existing rows keep null ("recorded before the name was"): every gateway treats them as its own.

Revision ID: gateway
Revises: procrastinate
Create Date: 2026-12-02

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "gateway"
down_revision: str | Sequence[str] | None = "procrastinate"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gateway", sa.String(length=64), nullable=True))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gateway", sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f("ix_instances_gateway"), ["gateway"])


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_gateway"))
        batch_op.drop_column("gateway")
    with op.batch_alter_table("associations", schema=None) as batch_op:
        batch_op.drop_column("gateway")
