"""SQLAlchemy 2.0 models: the audit trail is a first-class output of pacs-ai.

PHI (patient name/ID, accession number) may live here for admins; it never goes to logs.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

UID = String(64)
AE = String(16)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC on both SQLite (which stores naive values) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)  # type: ignore[no-any-return]
        return value.astimezone(dt.UTC)  # type: ignore[no-any-return]


NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    READY = "ready"
    PROCESSING = "processing"
    REPORTED = "reported"
    DELIVERED = "delivered"
    NOT_APPLICABLE = "not_applicable"
    FAILED = "failed"


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"


class JobState(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # will be retried
    DEAD = "dead"  # retries exhausted


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"  # claimed by an outbox run
    DELIVERED = "delivered"
    FAILED = "failed"  # will be retried
    DEAD = "dead"  # permanent failure or retries exhausted; an admin can re-queue


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Stored as plain strings (no native enum type) so adding a state is a data change only.
    return Enum(cls, name=name, native_enum=False, length=20, values_callable=_values)


def _values(cls: type[enum.Enum]) -> list[str]:
    return [m.value for m in cls]


class Association(Base):
    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str | None] = mapped_column(AE)
    called_ae: Mapped[str | None] = mapped_column(AE)
    peer_host: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int] = mapped_column(Integer)
    tls: Mapped[bool] = mapped_column(Boolean, default=False)
    accepted: Mapped[bool] = mapped_column(Boolean, default=False)
    reject_reason: Mapped[str | None] = mapped_column(String(200))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # released | aborted_by_peer | aborted | timeout | connection_lost | rejected | shutdown
    end_reason: Mapped[str | None] = mapped_column(String(40))
    instances_stored: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    bytes_received: Mapped[int] = mapped_column(BigInteger, default=0)
    # service.node_name of the gateway that received it (null: recorded before the name was).
    gateway: Mapped[str | None] = mapped_column(String(64))


class Study(Base):
    __tablename__ = "studies"
    # the pipeline's queue order and /metrics' oldest-ready age
    __table_args__ = (Index("ix_studies_state_ready_at", "state", "ready_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[StudyState] = mapped_column(
        _enum(StudyState, "study_state"), default=StudyState.RECEIVING, index=True
    )
    state_reason: Mapped[str | None] = mapped_column(String(200))
    # Bumped each time an instance arrives after the study was ready: the pipeline re-runs
    # the study and the new report references the previous one.
    revision: Mapped[int] = mapped_column(Integer, default=0)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    ready_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    state_changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # When retention last deleted this study's received objects (the rows stay).
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    series_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[SeriesState] = mapped_column(
        _enum(SeriesState, "series_state"), default=SeriesState.RECEIVING, index=True
    )
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The association that last delivered an instance, and when it ended (null while open):
    # the X-ray completion rule keys on association release.
    last_association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    completed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    not_applicable_reason: Mapped[str | None] = mapped_column(String(200))

    study: Mapped[Study] = relationship(back_populates="series")


class Instance(Base):
    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("sop_instance_uid", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # sha256 of the dataset bytes as received (without our File Meta header).
    sha256: Mapped[str] = mapped_column(String(64))
    # Relative to storage.path; derived from sha256, never from UIDs.
    path: Mapped[str] = mapped_column(String(200))
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # Same SOP Instance UID received earlier with different bytes: both are kept.
    conflicts_with_id: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    times_received: Mapped[int] = mapped_column(Integer, default=1)
    # Set when retention deleted the file (the row stays as history); cleared when the same
    # instance is received again and stored anew.
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # With storage.backend = "s3": when the object under its sha256 key was confirmed in the
    # bucket (null: still only in the local buffer; the uploader's queue).
    uploaded_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    # service.node_name of the gateway whose spool holds the file (null: recorded before the
    # name was; every gateway treats such a row as its own).
    gateway: Mapped[str | None] = mapped_column(String(64), index=True)


class Job(Base):
    """One attempt of the pipeline at one revision of a study."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_id", "study_revision", "attempt"),
        # Exactly-once (issue 12): at most one attempt of a study revision runs at a time
        # (a duplicate enqueue or a racing claim yields one job), and at most one succeeds
        # (a fenced-out worker that comes back late cannot commit a second result).
        Index(
            "uq_jobs_one_running",
            "study_id",
            "study_revision",
            unique=True,
            sqlite_where=text("state = 'running'"),
            postgresql_where=text("state = 'running'"),
        ),
        Index(
            "uq_jobs_one_succeeded",
            "study_id",
            "study_revision",
            unique=True,
            sqlite_where=text("state = 'succeeded'"),
            postgresql_where=text("state = 'succeeded'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    study_revision: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    state: Mapped[JobState] = mapped_column(
        _enum(JobState, "job_state"), default=JobState.RUNNING, index=True
    )
    # "name version" of each model that scored something, "; "-separated.
    models: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(32))
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    # Refreshed every pipeline.heartbeat_seconds while the attempt runs; an attempt whose
    # heartbeat is older than pipeline.stalled_seconds belongs to a dead worker.
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    duration_ms: Mapped[float | None] = mapped_column(Float)
    # When a failed attempt may be retried (null: now, or never for dead jobs).
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)
    error: Mapped[str | None] = mapped_column(Text)

    findings: Mapped[list[Finding]] = relationship(back_populates="job")


class Finding(Base):
    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"))
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    present: Mapped[bool] = mapped_column(Boolean)

    job: Mapped[Job] = relationship(back_populates="findings")


class Report(Base):
    """A report object pacs-ai made (SR, summary image, text SR), written under reports.path."""

    __tablename__ = "reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    study_revision: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # sr | summary | text_sr
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(300))  # relative to reports.path
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set when retention deleted the file (the row stays as history).
    purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # With storage.backend = "s3": when the file was put in the bucket (reports/<path>), so
    # a delivery or the console on another host can read it.
    uploaded_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)


class Delivery(Base):
    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("report_id", "destination"),
        Index("ix_deliveries_state_next", "state", "next_attempt_at"),
        Index("ix_deliveries_state_created_at", "state", "created_at"),  # oldest undelivered
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_id: Mapped[int] = mapped_column(ForeignKey("reports.id"))
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    # The resolved target (fixed at enqueue time; for return-to-sender, the study's sender).
    ae_title: Mapped[str] = mapped_column(AE)
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    state: Mapped[DeliveryState] = mapped_column(
        _enum(DeliveryState, "delivery_state"), default=DeliveryState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(300))
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    claimed_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, index=True)


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(64))  # AE title, "system", "admin:<user>"
    action: Mapped[str] = mapped_column(String(40), index=True)
    object_type: Mapped[str | None] = mapped_column(String(20))
    object_id: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(String(20))  # ok | refused | error | warning
    detail: Mapped[str | None] = mapped_column(Text)


class UserRole(enum.StrEnum):
    ADMIN = "admin"  # sees PHI, downloads objects, runs actions
    VIEWER = "viewer"  # sees state and results, never PHI


class User(Base):
    """A console user (``pacs-ai user add``); the password is stored as an argon2 hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[UserRole] = mapped_column(_enum(UserRole, "user_role"))
    password_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class ModelObservation(Base):
    """What a model said about one series (monitoring's rolling window, pacs_ai.monitoring):
    one row per finding with its score and decision, or one row (label "") for a series the
    model refused as out of distribution."""

    __tablename__ = "model_observations"
    __table_args__ = (Index("ix_model_observations_model_label", "model_name", "label", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(8))  # active | shadow
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"))
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float | None] = mapped_column(Float)
    present: Mapped[bool | None] = mapped_column(Boolean)
    refused: Mapped[bool] = mapped_column(Boolean, default=False)
    ood_score: Mapped[float | None] = mapped_column(Float)


class ModelAlert(Base):
    """A monitoring alert (collapse, positive rate out of band, score shift, OOD spike); open
    while ``cleared_at`` is null. ``value``: the window's statistic, ``reference``: the
    validation value it is compared with."""

    __tablename__ = "model_alerts"
    __table_args__ = (Index("ix_model_alerts_open", "model_name", "cleared_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    value: Mapped[float | None] = mapped_column(Float)
    reference: Mapped[float | None] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(String(300))
    raised_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    cleared_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
