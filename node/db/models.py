"""SQLAlchemy 2.0 typed models: what the node received, scored, sent and was told to do.

One row per association, instance, study, breast (patient + study + laterality, the prediction
unit), job (one scoring of a study, versioned), score, output object (SC/SR written to the
outbox), transmission (one output to one destination), model version and audit event.
Constraint names follow :data:`NAMING_CONVENTION` so Alembic migrations stay stable on SQLite
and PostgreSQL. Times are timezone-aware UTC. Callers own the commit.

Patient-identifying text (PatientID, names) lives only in ``studies.patient_id`` and in audit
events; application logs use UIDs and row IDs.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from node.db.states import JobState, StudyState, TransmissionState, check_sql

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)
AE = String(16)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_utc(value: dt.datetime) -> dt.datetime:
    """A time read back from the database as aware UTC: SQLite hands back naive datetimes (the
    node always writes UTC), PostgreSQL aware ones."""
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        dt.datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


class Association(Base):
    """One DICOM association request, accepted or rejected."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae: Mapped[str] = mapped_column(String(64))
    called_ae: Mapped[str] = mapped_column(String(64))
    peer_host: Mapped[str] = mapped_column(String(255))
    peer_port: Mapped[int] = mapped_column(Integer)
    accepted: Mapped[bool] = mapped_column(Boolean)
    reason: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[dt.datetime | None]


class Study(Base):
    """A study as received; ``state`` (:class:`~node.db.states.StudyState`) drives assembly:
    receiving -> queued -> scoring -> scored."""

    __tablename__ = "studies"
    __table_args__ = (CheckConstraint(check_sql("state", StudyState), name="state"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING, index=True)
    first_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[dt.datetime | None]
    """When assembly declared it ready (all views + grace, or quiet period)."""
    scored_version: Mapped[int] = mapped_column(Integer, default=0)

    instances: Mapped[list[Instance]] = relationship(back_populates="study")
    breasts: Mapped[list[Breast]] = relationship(back_populates="study")
    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Breast(Base):
    """The prediction unit: patient + study + laterality (L, R or U for unknown)."""

    __tablename__ = "breasts"
    __table_args__ = (UniqueConstraint("study_id", "laterality", name="uq_breasts_study_laterality"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    laterality: Mapped[str] = mapped_column(String(1))
    dirty: Mapped[bool] = mapped_column(Boolean, default=True)
    """New scorable images arrived since this breast was last scored."""
    scored_version: Mapped[int] = mapped_column(Integer, default=0)

    study: Mapped[Study] = relationship(back_populates="breasts")


class Instance(Base):
    """One received SOP instance and where it lies in the spool (a path built from UIDs)."""

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"), index=True)
    series_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    laterality: Mapped[str] = mapped_column(String(1), default="U")
    view: Mapped[str] = mapped_column(String(16), default="unknown")
    scorable: Mapped[bool] = mapped_column(Boolean, default=True)
    skip_reason: Mapped[str | None] = mapped_column(String(255))
    """Why it is not scored (not a mammogram, For Processing, ...); None when scorable."""
    spool_path: Mapped[str] = mapped_column(String(512))
    """Relative to the spool folder."""
    size_bytes: Mapped[int] = mapped_column(Integer)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    received_count: Mapped[int] = mapped_column(Integer, default=1)

    study: Mapped[Study] = relationship(back_populates="instances")


class ModelVersion(Base):
    """A model the node knows; exactly one is ``active`` once a model has been promoted."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("weights_sha256", name="uq_model_versions_weights_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    registered_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[dt.datetime | None]
    metrics: Mapped[dict[str, Any] | None]


class Job(Base):
    """One scoring of a study (``version`` 1, 2, ... as late images arrive), claimed by a worker."""

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("study_id", "version", name="uq_jobs_study_version"),
        Index("ix_jobs_state_created", "state", "created_at"),
        CheckConstraint(check_sql("state", JobState), name="state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    lateralities: Mapped[str] = mapped_column(String(8))
    """The breasts this version re-scores, e.g. ``LR`` or ``L``."""
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    """:class:`~node.db.states.JobState`: pending -> claimed -> done | failed (| dropped)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Failures the job raised itself (a worker dying while holding it is not one)."""
    retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """Transient faults met (disk full, database gone); they never fail the job."""
    next_attempt_at: Mapped[dt.datetime | None]
    """Not claimed before this time (backoff after a failure or a transient fault)."""
    claimed_by: Mapped[str | None] = mapped_column(String(128))
    claimed_at: Mapped[dt.datetime | None]
    lease_expires_at: Mapped[dt.datetime | None]
    """The claim lapses at this time unless the claimer's heartbeat renews it; another worker may
    then take the job over (a claim is not an attempt)."""
    finished_at: Mapped[dt.datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="jobs")
    scores: Mapped[list[Score]] = relationship(back_populates="job")


class Score(Base):
    """A probability at one level (image, breast, exam) of one job, traceable to its model."""

    __tablename__ = "scores"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    level: Mapped[str] = mapped_column(String(8))
    laterality: Mapped[str | None] = mapped_column(String(1))
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    probability: Mapped[float] = mapped_column(Float)
    recall: Mapped[bool | None] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)
    aggregation: Mapped[str | None] = mapped_column(String(16))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    input_uids: Mapped[dict[str, Any] | None]
    """``{"sop_instance_uids": [...]}``: the images behind a breast or exam score."""
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="scores")


class OutputObject(Base):
    """An SC or SR written to the outbox folder; its SOP Instance UID is deterministic."""

    __tablename__ = "output_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(4))
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    outbox_path: Mapped[str] = mapped_column(String(512))
    """Relative to the outbox folder."""
    source_uids: Mapped[dict[str, Any] | None]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    transmissions: Mapped[list[Transmission]] = relationship(back_populates="output")


class Transmission(Base):
    """One output object to one destination: the outbox row the sender works through."""

    __tablename__ = "transmissions"
    __table_args__ = (
        UniqueConstraint("output_id", "destination", name="uq_transmissions_output_destination"),
        Index("ix_transmissions_state_next", "state", "next_attempt_at"),
        CheckConstraint(check_sql("state", TransmissionState), name="state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("output_objects.id", ondelete="CASCADE"))
    destination: Mapped[str] = mapped_column(String(300))
    """``AE@HOST:PORT``."""
    state: Mapped[str] = mapped_column(String(16), default=TransmissionState.PENDING)
    """:class:`~node.db.states.TransmissionState`: pending | sent | failed (will retry) | dead
    (permanent or too old) | dropped (by an operator)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[dt.datetime | None]

    output: Mapped[OutputObject] = relationship(back_populates="transmissions")


class AuditEvent(Base):
    """Append-only record of who sent, scored, delivered or changed what (database triggers
    refuse UPDATE and DELETE). The only table that links patient IDs to studies for people.

    The rows form a hash chain (:mod:`node.audit.chain`): ``seq`` is the row's position (1, 2,
    ... with no gap, in commit order), ``prev_hash`` the ``row_hash`` of the row before it and
    ``row_hash`` the SHA-256 of ``prev_hash`` and the row's own content, so an edited, deleted,
    inserted or moved row breaks the chain (``mammonode audit verify``).
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        Index("ix_audit_events_study_at", "study_uid", "at"),
        Index("ix_audit_events_event_at", "event", "at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    event: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(128))
    """``scp``, ``worker``, ``sender`` or ``cli:<user>``."""
    patient_id: Mapped[str | None] = mapped_column(String(64), index=True)
    study_uid: Mapped[str | None] = mapped_column(UID)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    calling_ae: Mapped[str | None] = mapped_column(String(64))
    peer: Mapped[str | None] = mapped_column(String(300))
    details: Mapped[dict[str, Any] | None]
    seq: Mapped[int] = mapped_column(Integer, unique=True)
    """Position in the chain, assigned at commit under the chain head's lock."""
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The one row saying where the audit chain ends: the last ``seq`` and its ``row_hash``.

    Every transaction that appends audit events locks this row just before it commits, so the
    chain stays linear with any number of writers; and it is the tail check of ``audit verify``
    (rows cut from the end leave the head pointing past them). Triggers let it move only forward.
    """

    __tablename__ = "audit_chain_head"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    row_hash: Mapped[str] = mapped_column(String(64))
