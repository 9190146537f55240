"""Rows for console tests: one study through the whole flow, written straight to the database
(the browser test drives the real service instead)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import Engine, insert

from pacs_ai.db.models import (
    Association,
    Delivery,
    DeliveryState,
    Finding,
    Instance,
    Job,
    JobState,
    Report,
    Series,
    SeriesState,
    Study,
    StudyState,
)

HOSTILE_NAME = "<script>alert('x')</script>^Evil"
PATIENT_ID = "PHI-ID-778899"
ACCESSION = "ACC-55501"


@dataclass(frozen=True)
class Seeded:
    study_id: int
    study_uid: str
    delivery_id: int
    association_id: int


def seed_study(
    engine: Engine,
    n: int = 1,
    state: StudyState = StudyState.REPORTED,
    delivery_state: DeliveryState = DeliveryState.DEAD,
    present: bool = True,
    patient_name: str = HOSTILE_NAME,
    minutes_ago: float = 0.0,
    modality: str = "DX",
    patient_id: str = PATIENT_ID,
    accession: str = ACCESSION,
) -> Seeded:
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=minutes_ago)
    uid = f"1.2.826.0.1.3680043.10.9999.{n}"
    with engine.begin() as c:
        aid = c.execute(
            insert(Association)
            .values(
                calling_ae="MODALITY1",
                called_ae="PACS_AI",
                peer_host="127.0.0.1",
                peer_port=40000 + n,
                tls=False,
                accepted=True,
                started_at=now - dt.timedelta(minutes=5),
                ended_at=now - dt.timedelta(minutes=4),
                end_reason="released",
                instances_stored=1,
                instances_failed=0,
                bytes_received=1000 + n,
            )
            .returning(Association.id)
        ).scalar_one()
        sid = c.execute(
            insert(Study)
            .values(
                study_uid=uid,
                patient_id=patient_id,
                patient_name=patient_name,
                accession_number=accession,
                study_date="20261201",
                study_description="CHEST PA",
                state=state,
                revision=0,
                instance_count=1,
                first_received_at=now - dt.timedelta(minutes=5),
                last_received_at=now - dt.timedelta(minutes=5),
                ready_at=now - dt.timedelta(minutes=4),
                state_changed_at=now - dt.timedelta(minutes=3),
            )
            .returning(Study.id)
        ).scalar_one()
        series_id = c.execute(
            insert(Series)
            .values(
                study_id=sid,
                series_uid=f"{uid}.1",
                modality=modality,
                body_part="CHEST",
                state=SeriesState.COMPLETE,
                instance_count=1,
                last_received_at=now - dt.timedelta(minutes=5),
                last_association_id=aid,
                completed_at=now - dt.timedelta(minutes=4),
            )
            .returning(Series.id)
        ).scalar_one()
        c.execute(
            insert(Instance).values(
                study_id=sid,
                series_id=series_id,
                association_id=aid,
                sop_instance_uid=f"{uid}.1.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                size_bytes=1000 + n,
                sha256=f"{n:064x}",
                path=f"objects/{n:064x}.dcm",
                received_at=now - dt.timedelta(minutes=5),
            )
        )
        jid = c.execute(
            insert(Job)
            .values(
                study_id=sid,
                study_revision=0,
                attempt=1,
                state=JobState.SUCCEEDED,
                models="cxr-demo 1.0",
                device="cpu",
                started_at=now - dt.timedelta(minutes=5),
                finished_at=now - dt.timedelta(minutes=5) + dt.timedelta(seconds=1.5),
                duration_ms=1500.0,
            )
            .returning(Job.id)
        ).scalar_one()
        for label, p in (("covid", 0.91 if present else 0.1), ("pneumonia", 0.2)):
            c.execute(
                insert(Finding).values(
                    job_id=jid,
                    series_id=series_id,
                    model_name="cxr-demo",
                    model_version="1.0",
                    label=label,
                    probability=p,
                    threshold=0.5,
                    present=p >= 0.5,
                )
            )
        rid = c.execute(
            insert(Report)
            .values(
                study_id=sid,
                job_id=jid,
                study_revision=0,
                kind="sr",
                sop_instance_uid=f"{uid}.99.{n}",
                series_instance_uid=f"{uid}.99",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                path=f"study-{sid}/missing-sr.dcm",
                created_at=now - dt.timedelta(minutes=3),
            )
            .returning(Report.id)
        ).scalar_one()
        did = c.execute(
            insert(Delivery)
            .values(
                report_id=rid,
                study_id=sid,
                destination="pacs",
                ae_title="ORTHANC",
                host="127.0.0.1",
                port=4242,
                state=delivery_state,
                attempts=3,
                last_error=None
                if delivery_state == DeliveryState.DELIVERED
                else "connection refused",
                created_at=now - dt.timedelta(minutes=3),
                delivered_at=now - dt.timedelta(minutes=4, seconds=57)
                if delivery_state == DeliveryState.DELIVERED
                else None,
            )
            .returning(Delivery.id)
        ).scalar_one()
    return Seeded(sid, uid, did, aid)
