"""The Trainer's callback that writes a job's progress, metrics, events and checkpoints to the database."""

import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from app.db import Database, utcnow
from app.models import Checkpoint, Job, JobEvent, Metric
from model import Callback, Progress, read_metadata

WRITE_INTERVAL_S = 0.5  # progress and metrics are written at most this often, and always at checkpoints


class JobReporter(Callback):
    def __init__(self, database: Database, job_id: str, owner: str, data_dir: Path, parent_checkpoint_id: str | None,
                 prompt_format: str | None = None):
        self.database, self.job_id, self.owner, self.data_dir = database, job_id, owner, data_dir
        self.parent_checkpoint_id, self.prompt_format = parent_checkpoint_id, prompt_format
        self.pending_metrics: list[dict] = []
        self.progress: Progress | None = None
        self.last_write = 0.0
        self.stop_reason: str | None = None  # "cancelled", "lease lost" or "shutdown"

    def _insert_ignoring_duplicates(self, session, rows: list[dict]) -> None:
        # a resumed job reports again the steps after its last checkpoint: the first row of each stays
        insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
        session.execute(insert(Metric).values(rows).on_conflict_do_nothing(
            index_elements=["job_id", "name", "step"]))

    def flush(self) -> None:
        """Write the buffered metrics and the latest progress; learn whether the job was cancelled."""
        self.last_write = time.monotonic()
        with self.database.session() as session:
            if self.pending_metrics:
                self._insert_ignoring_duplicates(session, self.pending_metrics)
                self.pending_metrics = []
            values = {"heartbeat_at": utcnow()}
            if self.progress is not None:
                p = self.progress
                values.update(step=p.step, tokens_seen=p.tokens_seen, tokens_per_s=p.tokens_per_s, eta_s=p.eta_s,
                              train_loss=p.train_loss, val_loss=p.val_loss)
            ours = session.execute(update(Job).where(Job.id == self.job_id, Job.lease_owner == self.owner,
                                                     Job.status == "running").values(**values)).rowcount
            cancelled = session.scalar(select(Job.cancel_requested).where(Job.id == self.job_id))
        if not ours:
            self.stop_reason = "lease lost"
        elif cancelled:
            self.stop_reason = "cancelled"

    def _due(self) -> bool:
        return time.monotonic() - self.last_write >= WRITE_INTERVAL_S

    def on_progress(self, progress: Progress) -> None:
        self.progress = progress
        if self._due() or progress.step == progress.total_steps:
            self.flush()

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        now = utcnow()
        self.pending_metrics += [{"job_id": self.job_id, "step": step, "name": name, "value": float(value),
                                  "time": now} for name, value in metrics.items()]

    def on_sample(self, step: int, text: str) -> None:
        self.event("sample", f"sample at step {step}", {"step": step, "text": text})

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        self.flush()
        meta = read_metadata(path)
        with self.database.session() as session:
            checkpoint = Checkpoint(job_id=self.job_id, step=step, path=str(path.relative_to(self.data_dir)),
                                    size_bytes=sum(f.stat().st_size for f in path.iterdir()), task=meta["task"],
                                    label_names=meta.get("label_names"), metrics=dict(metrics),
                                    model_config=meta["model"], tokenizer_type=meta["tokenizer"]["type"],
                                    prompt_format=self.prompt_format, parent_id=self.parent_checkpoint_id)
            session.add(checkpoint)
            session.flush()
            session.add(JobEvent(job_id=self.job_id, type="checkpoint", message=f"checkpoint at step {step}",
                                 data={"checkpoint_id": checkpoint.id, "step": step, "metrics": dict(metrics)}))

    def should_stop(self) -> bool:
        if self._due():
            self.flush()
        return self.stop_reason is not None

    def event(self, type_: str, message: str, data: dict | None = None, level: str = "info") -> None:
        with self.database.session() as session:
            session.add(JobEvent(job_id=self.job_id, type=type_, level=level, message=message, data=data))
