"""console users; indexes for the console's lists and /metrics

Revision ID: web
Revises: retention
Create Date: 2026-12-02

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
import pacs_ai.db.models


revision: str = 'web'
down_revision: Union[str, Sequence[str], None] = 'retention'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('users',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('role', sa.Enum('admin', 'viewer', name='user_role', native_enum=False, length=20), nullable=False),
    sa.Column('password_hash', sa.String(length=200), nullable=False),
    sa.Column('created_at', pacs_ai.db.models.UTCDateTime(timezone=True), nullable=False),
    sa.Column('last_login_at', pacs_ai.db.models.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_users')),
    sa.UniqueConstraint('name', name=op.f('uq_users_name'))
    )
    # what the console's overview, lists and searches filter on (benchmarks/console.py)
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_studies_accession_number'), ['accession_number'], unique=False)
        batch_op.create_index(batch_op.f('ix_studies_first_received_at'), ['first_received_at'], unique=False)
        batch_op.create_index('ix_studies_state_ready_at', ['state', 'ready_at'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_jobs_started_at'), ['started_at'], unique=False)
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deliveries_delivered_at'), ['delivered_at'], unique=False)
        batch_op.create_index('ix_deliveries_state_created_at', ['state', 'created_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_deliveries_state_created_at')
        batch_op.drop_index(batch_op.f('ix_deliveries_delivered_at'))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_started_at'))
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index('ix_studies_state_ready_at')
        batch_op.drop_index(batch_op.f('ix_studies_first_received_at'))
        batch_op.drop_index(batch_op.f('ix_studies_accession_number'))
    op.drop_table('users')
