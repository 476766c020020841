"""The Trainer's callback that writes a job's progress, metrics, events and checkpoints to the database."""

import logging
import shutil
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError, OperationalError

from core import checkpoints, jobs
from core.checkpoints import register_checkpoint
from core.db import Database, utcnow
from core.storage import DataDir
from core.tables import JobEvent, Metric
from model import Callback, TrainProgress, drop_training_state, has_training_state, read_metadata

WRITE_INTERVAL_S = 0.5  # progress and metrics are written at most this often, and always at checkpoints
DATABASE_RETRY_S = 60.0  # a write waits this long for a database that went away (a restart, a failover)

log = logging.getLogger(__name__)
T = TypeVar("T")


def retrying(write: Callable[[], T], what: str) -> T:
    """Run a write in its own transaction, again while the database is unreachable, up to DATABASE_RETRY_S.
    A write that failed rolled back whole; the lease it renews is judged by the database's clock, so an outage
    longer than the heartbeat timeout ends with the lease lost, as for a silent worker."""
    deadline, delay = time.monotonic() + DATABASE_RETRY_S, 0.2
    while True:
        try:
            return write()
        except DBAPIError as e:
            if not (isinstance(e, OperationalError) or e.connection_invalidated) or time.monotonic() >= deadline:
                raise
            log.warning("%s failed, the database is unreachable: trying again in %.1f s (%s)", what, delay,
                        str(e.orig or e).strip().splitlines()[0])
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


class StopReason(StrEnum):
    """Why a job is stopping before its end."""

    CANCELLED = "cancelled"
    LEASE_LOST = "lease lost"  # it was taken from this worker (presumed dead): whoever holds it now ends it
    SHUTDOWN = "shutdown"  # this worker is shutting down: the job goes back to the queue


STOP_REASONS = {jobs.Lease.CANCEL_REQUESTED: StopReason.CANCELLED, jobs.Lease.LOST: StopReason.LEASE_LOST}


class JobReporter(Callback):
    def __init__(self, database: Database, job_id: str, owner: str, storage: DataDir, keep_checkpoints: int = 0):
        self.database, self.job_id, self.owner, self.storage = database, job_id, owner, storage
        self.keep_checkpoints = keep_checkpoints  # checkpoints.retain's keep
        self.pending_metrics: list[dict] = []
        self.progress: TrainProgress | None = None
        self.last_write = 0.0
        self.stop_reason: StopReason | None = None

    def _insert_ignoring_duplicates(self, session, rows: list[dict]) -> None:
        # a resumed job reports again the steps after its last checkpoint: the first row of each stays
        insert = pg_insert if session.bind.dialect.name == "postgresql" else sqlite_insert
        session.execute(insert(Metric).values(rows).on_conflict_do_nothing(
            index_elements=["job_id", "name", "step"]))

    def _report(self, session) -> jobs.Lease:
        """Renew the lease with the latest progress, then write the buffered metrics if the job is still ours;
        learn whether it was cancelled or lost."""
        p = self.progress
        progress = {} if p is None else dict(
            step=p.step, total_steps=p.total_steps, tokens_seen=p.tokens_seen, tokens_per_s=p.tokens_per_s,
            eta_s=p.eta_s, train_loss=p.train_loss, val_loss=p.val_loss)
        lease = jobs.heartbeat(session, self.job_id, self.owner, **progress)
        if self.pending_metrics and lease != jobs.Lease.LOST:
            self._insert_ignoring_duplicates(session, self.pending_metrics)
        self.stop_reason = STOP_REASONS.get(lease, self.stop_reason)
        return lease

    def flush(self) -> None:
        """Write the latest progress and the buffered metrics; learn whether the job was cancelled or lost."""
        self.last_write = time.monotonic()

        def write() -> None:
            with self.database.session() as session:
                self._report(session)
            self.pending_metrics = []  # once committed: a write that failed is tried again with them

        retrying(write, f"progress of job {self.job_id}")

    def _due(self) -> bool:
        return time.monotonic() - self.last_write >= WRITE_INTERVAL_S

    def on_progress(self, progress: TrainProgress) -> None:
        self.progress = progress
        if self._due() or progress.step == progress.total_steps:
            self.flush()

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        now = utcnow()
        self.pending_metrics += [{"job_id": self.job_id, "step": step, "name": name, "value": float(value),
                                  "time": now} for name, value in metrics.items()]

    def on_sample(self, step: int, text: str) -> None:
        self.event("sample", f"sample at step {step}", {"step": step, "text": text})

    def may_checkpoint(self) -> bool:
        # a worker that lost the job must not write into the directory of the worker that holds it now
        self.flush()
        return self.stop_reason != StopReason.LEASE_LOST

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None:
        def register() -> bool:
            with self.database.session() as session:
                # the lease renewed in the transaction that registers: no row outlives a lost lease
                held = self._report(session) != jobs.Lease.LOST
                if held:
                    checkpoint = register_checkpoint(session, self.storage, path, read_metadata(path),
                                                     job_id=self.job_id)
                    session.add(JobEvent(job_id=self.job_id, type="checkpoint", message=f"checkpoint at step {step}",
                                         data={"checkpoint_id": checkpoint.id, "step": step,
                                               "metrics": dict(metrics)}))
            self.pending_metrics = []
            return held

        held = retrying(register, f"checkpoint of job {self.job_id} at step {step}")
        if not held:  # lost while the directory was written: its files are no one's
            shutil.rmtree(path, ignore_errors=True)
            return
        retrying(self._retain, f"checkpoint retention of job {self.job_id}")

    def _retain(self) -> None:
        """The job's checkpoints pruned to what it keeps; the optimizer state on its newest alone."""
        with self.database.session() as session:
            for older in checkpoints.retain(session, self.storage, self.job_id, self.keep_checkpoints):
                directory = self.storage.checkpoint_dir(older.path)
                if has_training_state(directory):
                    drop_training_state(directory)
                    checkpoints.refresh_size(self.storage, older)
            session.commit()

    def stopped_early(self, step: int, patience: int) -> None:
        self.event("early_stop", f"stopped early at step {step}: {patience} evaluations in a row found no lower "
                                 f"val_loss", {"step": step, "patience": patience})

    def should_stop(self) -> bool:
        if self._due():
            self.flush()
        return self.stop_reason is not None

    def event(self, type_: str, message: str, data: dict | None = None, level: str = "info") -> None:
        def write() -> None:
            with self.database.session() as session:
                session.add(JobEvent(job_id=self.job_id, type=type_, level=level, message=message, data=data))

        retrying(write, f"event of job {self.job_id}")


def stop_also_on(shutdown: threading.Event, reporter: JobReporter) -> Callable[[], bool]:
    """The reporter's should_stop, also true once shutdown is set (the worker is shutting down: the job is
    to be handed back)."""
    checks_database = reporter.should_stop

    def should_stop() -> bool:
        if shutdown.is_set() and reporter.stop_reason is None:
            reporter.stop_reason = StopReason.SHUTDOWN
        return checks_database() or reporter.stop_reason is not None

    return should_stop
