"""Start-up reconciliation of the spool with the database.

After a crash (even ``kill -9``) every instance that was answered with Success has its file
in ``objects/`` and its row in ``instances``; what else may be found is handled here:

- files in ``tmp/``: never acknowledged; removed;
- files in ``objects/`` without a row (crash between placing and committing): never
  acknowledged. Their name is the sha256 of their dataset bytes, so a torn one (hash
  mismatch) is removed; a complete one is moved to ``quarantine/``, audited, never deleted;
- rows whose file is missing: audited as errors (should not happen; an admin must look);
- associations left open: closed with end reason ``interrupted``, so their X-ray series can
  complete.

With several gateways on one database (``service.node_name``), the last two look only at this
gateway's rows and at rows recorded before names were (null gateway): another gateway's
files are on its own disk and its open associations are live.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Engine, or_, select, update

from pacs_ai.db.events import write_audit
from pacs_ai.db.models import Association, Instance, utcnow
from pacs_ai.ingest.spool import Spool, dataset_sha256

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    partial_removed: int  # in tmp/, or torn in objects/: never acknowledged
    orphans_quarantined: int
    missing_files: int
    associations_closed: int


def recover(spool: Spool, engine: Engine, gateway: str | None = None) -> RecoveryReport:
    """Reconcile ``spool`` with the rows of ``gateway`` (``service.node_name``; None: every
    row, a single-gateway installation's old behaviour)."""
    partial = spool.prepare()
    with engine.begin() as s:
        known = set(s.scalars(select(Instance.path)).all())
        orphans = torn = 0
        for path in spool.iter_objects():
            rel = str(path.relative_to(spool.root))
            if rel in known:
                continue
            if dataset_sha256(path) != path.stem:
                path.unlink()
                torn += 1
                continue
            dest = spool.quarantine(path)
            orphans += 1
            write_audit(s, "system", "orphan_quarantined", "warning", detail={"file": dest.name})
        missing = 0
        # An uploaded instance (storage.backend = "s3") may have had its local copy evicted.
        waiting = select(Instance.id, Instance.path).where(
            Instance.uploaded_at.is_(None), Instance.purged_at.is_(None)
        )
        open_assocs: ColumnElement[bool] = Association.ended_at.is_(None)
        if gateway is not None:
            waiting = waiting.where(or_(Instance.gateway == gateway, Instance.gateway.is_(None)))
            open_assocs = open_assocs & or_(
                Association.gateway == gateway, Association.gateway.is_(None)
            )
        for inst_id, rel in s.execute(waiting):
            if not (spool.root / rel).is_file():
                missing += 1
                write_audit(s, "system", "instance_file_missing", "error", "instance", inst_id)
        closed = len(
            s.scalars(
                update(Association)
                .where(open_assocs)
                .values(ended_at=utcnow(), end_reason="interrupted")
                .returning(Association.id)
            ).all()
        )
        report = RecoveryReport(partial + torn, orphans, missing, closed)
        if partial or orphans or missing or closed:
            write_audit(s, "system", "recovery", "warning", detail=report.__dict__)
    log.info(
        "recovery: %d partial files removed, %d orphans quarantined, %d files missing, "
        "%d interrupted associations closed",
        partial,
        orphans,
        missing,
        report.associations_closed,
    )
    return report
