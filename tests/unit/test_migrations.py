"""`alembic upgrade head` must produce exactly the models' metadata, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from pacs_ai.config import DatabaseSettings
from pacs_ai.db.models import Base
from pacs_ai.db.session import current_revision, head_revision, make_engine, upgrade


def _ours(name: str | None, type_: str, _parents: object) -> bool:
    """procrastinate's tables (PostgreSQL only, its vendored schema) are not in our models."""
    return not (type_ == "table" and (name or "").startswith("procrastinate_"))


def test_upgrade_head_matches_models(db_url: str) -> None:
    engine = make_engine(DatabaseSettings(url=db_url))
    upgrade(engine)
    upgrade(engine)  # idempotent
    assert current_revision(engine) == head_revision()
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "include_name": _ours})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []
