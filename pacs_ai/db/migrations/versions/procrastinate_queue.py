"""procrastinate: the task queue's schema (PostgreSQL only)

Revision ID: procrastinate
Revises: s3
Create Date: 2026-12-02

The schema is procrastinate 3.10.0's ``procrastinate/sql/schema.sql`` (MIT licence, (c)
PeopleDoc and contributors), vendored as ``procrastinate_3_10_0_schema.sql`` beside this file
so that this migration never changes when the package is upgraded: a later procrastinate
version brings its own ``sql/migrations/*.sql``, applied by a later migration of ours.
SQLite has no procrastinate (the ledger alone drives the queue there): nothing to do.
"""

from collections.abc import Sequence
from pathlib import Path

from alembic import op

revision: str = "procrastinate"
down_revision: str | Sequence[str] | None = "s3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = Path(__file__).with_name("procrastinate_3_10_0_schema.sql")

# What `downgrade` removes: every object the schema file creates.
TABLES = (
    "procrastinate_events",
    "procrastinate_periodic_defers",
    "procrastinate_jobs",
    "procrastinate_workers",
)


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    # The file is one script of statements and plpgsql bodies ($$ ... $$), with literal '%':
    # run on the DB-API cursor without parameters (no placeholder parsing), in the migration's
    # transaction.
    cursor = bind.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(SCHEMA.read_text(encoding="utf-8"))
    finally:
        cursor.close()


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
    op.execute(
        "DO $$ DECLARE f record; BEGIN FOR f IN SELECT oid::regprocedure AS sig FROM pg_proc "
        "WHERE proname LIKE 'procrastinate\\_%' LOOP EXECUTE 'DROP FUNCTION ' || f.sig || "
        "' CASCADE'; END LOOP; END $$"
    )
    for typ in (
        "procrastinate_job_to_defer_v1",
        "procrastinate_job_status",
        "procrastinate_job_event_type",
    ):
        op.execute(f"DROP TYPE IF EXISTS {typ} CASCADE")
