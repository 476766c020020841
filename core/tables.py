"""The tables: corpora, jobs with their events and metrics, checkpoints, evaluations, deployments and API keys."""

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from core.db import Base, UTCDateTime, new_id, utcnow
from core.enums import CheckpointSource


class Corpus(Base):
    __tablename__ = "corpora"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("corpus"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # a CorpusKind
    filename: Mapped[str] = mapped_column(String(255))  # as uploaded; shown, never used as a path
    format: Mapped[str] = mapped_column(String(10))  # txt, csv, tsv, jsonl, json
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    n_records: Mapped[int] = mapped_column(Integer)  # lines of text, labelled texts or instructions
    n_tokens: Mapped[int | None] = mapped_column(BigInteger)  # GPT-2 tokens; None until counted
    label_names: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_type", "status", "type"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("job"))
    name: Mapped[str | None] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(30))  # a core.jobs.JobType
    status: Mapped[str] = mapped_column(String(20))  # a core.jobs.JobStatus, changed only by core.jobs
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id", ondelete="RESTRICT"), index=True)
    validation_corpus_id: Mapped[str | None] = mapped_column(ForeignKey("corpora.id", ondelete="RESTRICT"))
    # jobs and checkpoints point at each other: this constraint is added after both tables exist
    base_checkpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="RESTRICT", use_alter=True))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # the validated request, with defaults filled in
    seed: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    tokens_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    eta_s: Mapped[float | None] = mapped_column(Float)
    train_loss: Mapped[float | None] = mapped_column(Float)
    val_loss: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(100))  # the worker running it
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # "run job X" last sent to the broker
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    events: Mapped[list["JobEvent"]] = relationship(back_populates="job", passive_deletes=True)


class JobPart(Base):
    """A worker's part of an attempt of a job across several machines (`nodes`): part 0 runs the job as one
    worker runs any job and publishes where its ranks meet; each other part's worker runs its ranks there. The
    key lets one worker alone take each part of an attempt."""

    __tablename__ = "job_parts"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    part: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(100))
    rendezvous: Mapped[str | None] = mapped_column(String(300))  # part 0's: host:port of torch.distributed's store
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(10), default="info")
    type: Mapped[str] = mapped_column(String(30))  # status, progress, checkpoint, sample, error, ...
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="events")


class Metric(Base):
    __tablename__ = "metrics"
    # a resumed job re-reports the steps after its last checkpoint: one row per (job, name, step)
    __table_args__ = (UniqueConstraint("job_id", "name", "step", name="uq_metrics_job_name_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    step: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(50))
    value: Mapped[float] = mapped_column(Float)
    time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("ckpt"))
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(500))  # relative to the data dir
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    task: Mapped[str] = mapped_column(String(20))  # a CheckpointTask
    label_names: Mapped[list[str] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    model_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    tokenizer_type: Mapped[str] = mapped_column(String(20))
    prompt_format: Mapped[str | None] = mapped_column(String(20))  # "alpaca" for instruction finetunes
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"))
    source: Mapped[str] = mapped_column(String(20), default=CheckpointSource.TRAINING)
    # an adapter-only checkpoint holds LoRA's tensors alone: it is loaded over this one, which must stay
    adapter_of_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="RESTRICT"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Evaluation(Base):
    """The results of an `evaluate` job: one checkpoint scored on one corpus."""

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("eval"))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), unique=True)
    # the numbers outlive a deleted checkpoint: they are the record of why it was dropped
    checkpoint_id: Mapped[str | None] = mapped_column(ForeignKey("checkpoints.id", ondelete="SET NULL"), index=True)
    corpus_id: Mapped[str] = mapped_column(ForeignKey("corpora.id", ondelete="RESTRICT"), index=True)
    kind: Mapped[str] = mapped_column(String(20))  # an EvaluationKind
    settings: Mapped[dict[str, Any]] = mapped_column(JSON)  # windowing, limits, judge: what the numbers depend on
    metrics: Mapped[dict[str, float] | None] = mapped_column(JSON)  # flat name -> number, for comparing
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # per class, confusion matrix, judge, ...
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    job: Mapped[Job] = relationship()


class EvaluationExample(Base):
    """One scored record of an evaluation: a classified text or an answered instruction."""

    __tablename__ = "evaluation_examples"
    __table_args__ = (UniqueConstraint("evaluation_id", "position", name="uq_evaluation_examples_position"),
                      Index("ix_evaluation_examples_score", "evaluation_id", "score"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    evaluation_id: Mapped[str] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # the record's index in the corpus
    score: Mapped[float] = mapped_column(Float)  # lower is worse: the true class's probability, token F1
    data: Mapped[dict[str, Any]] = mapped_column(JSON)


class Deployment(Base):
    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("dep"))
    name: Mapped[str] = mapped_column(String(100), unique=True)
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id", ondelete="RESTRICT"), index=True)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    # asked for, `auto` or explicit: each API process resolves it on its own hardware (serving.placement)
    device: Mapped[str] = mapped_column(String(16), default="auto", server_default="auto")
    dtype: Mapped[str] = mapped_column(String(16), default="auto", server_default="auto")  # a ServingDtype
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    adapters: Mapped[list["DeploymentAdapter"]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="DeploymentAdapter.name")


class DeploymentAdapter(Base):
    """An adapter-only checkpoint a deployment serves over its own checkpoint, chosen per request by the model
    name `<deployment>:<adapter>`."""

    __tablename__ = "deployment_adapters"
    __table_args__ = (UniqueConstraint("deployment_id", "name", name="uq_deployment_adapters_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    checkpoint_id: Mapped[str] = mapped_column(ForeignKey("checkpoints.id", ondelete="RESTRICT"), index=True)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("key"))
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[str] = mapped_column(String(10))  # a KeyScope
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256; the key itself is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart in listings
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
