"""Alembic environment: the target metadata is pacs_ai's models.

pacs-ai passes an open connection (``config.attributes["connection"]``); the ``alembic``
command line instead uses ``sqlalchemy.url`` or the PACS_AI_DATABASE__URL variable.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from pacs_ai.db.models import Base

config = context.config
target_metadata = Base.metadata


def _ours(name: str | None, type_: str, _parents: object) -> bool:
    """procrastinate's tables (migration ``procrastinate``, PostgreSQL) are not in the models:
    autogenerate leaves them alone."""
    return not (type_ == "table" and (name or "").startswith("procrastinate_"))


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        include_name=_ours,
        render_as_batch=True,  # SQLite needs batch mode for ALTER
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    conn = config.attributes.get("connection")
    if conn is not None:
        _run(conn)
        return
    url = os.environ.get("PACS_AI_DATABASE__URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("set PACS_AI_DATABASE__URL to the database to migrate")
    engine = create_engine(url)
    with engine.begin() as connection:
        _run(connection)


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
