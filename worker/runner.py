"""Running one job in a worker process: take its lease, train or evaluate, report, and end it in exactly one
state."""

import logging
import signal
import threading

from sqlalchemy import select

from core import jobs
from core.db import Database
from core.jobs import JobStatus, JobType
from core.queue import JobQueue
from core.settings import Settings
from core.tables import Checkpoint, Corpus, Job
from model import Trainer, has_training_state, load_checkpoint
from worker.evaluation import evaluate
from worker.handback import HAND_BACK_SIGNAL
from worker.reporting import JobReporter, StopReason, retrying
from worker.training import plan_job

log = logging.getLogger(__name__)

_databases: dict[str, Database] = {}


def _database(settings: Settings) -> Database:
    url = settings.sqlalchemy_url
    if url not in _databases:
        _databases[url] = Database(url)
    return _databases[url]


class _Heartbeat(threading.Thread):
    """Renews the lease while a long step (or the data preparation) keeps the trainer from reporting."""

    def __init__(self, database: Database, job_id: str, owner: str, interval_s: float):
        super().__init__(daemon=True)
        self.database, self.job_id, self.owner, self.interval_s = database, job_id, owner, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval_s):
            try:
                with self.database.session() as session:
                    jobs.heartbeat(session, self.job_id, self.owner)
            except Exception:  # a brief database outage: the next beat tries again
                log.exception("heartbeat of job %s failed", self.job_id)


def _resume_point(session, job_id: str, settings: Settings) -> Checkpoint | None:
    """The job's latest checkpoint whose directory still holds its training state."""
    for checkpoint in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                      .order_by(Checkpoint.step.desc())):
        if has_training_state(settings.storage.checkpoint_dir(checkpoint.path)):
            return checkpoint
    return None


def _finish(database: Database, job_id: str, owner: str, status: JobStatus, message: str, **details) -> None:
    def write() -> None:
        with database.session() as session:
            jobs.finish(session, job_id, owner, status, message, **details)

    retrying(write, f"the end of job {job_id}")


def run(settings: Settings, job_id: str, owner: str) -> None:
    database = _database(settings)
    with database.session() as session:
        claimed = jobs.claim(session, job_id, owner, settings.heartbeat_timeout_s, settings.max_attempts)
    if not claimed:
        log.info("job %s is not ours to run (finished, cancelled, leased by a live worker or at the attempt cap)",
                 job_id)
        return
    beat = _Heartbeat(database, job_id, owner, settings.heartbeat_interval_s)
    beat.start()
    reporter = None
    shutdown = threading.Event()
    # the worker shutting down signals its pool processes: finish the step, checkpoint, hand the job back
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(HAND_BACK_SIGNAL, lambda *_: shutdown.set()) if in_main_thread else None
    try:
        with database.session() as session:
            job = session.get(Job, job_id)
        reporter = JobReporter(database, job_id, owner, settings.storage)
        reporter.should_stop = _stop_also_on(shutdown, reporter)
        if job.type == JobType.EVALUATE:
            metrics = evaluate(database, settings, job_id, reporter)
            step = reporter.progress.step if reporter.progress else 0
        else:
            metrics, step = _train(database, settings, job, reporter)
    except Exception as e:
        log.exception("job %s failed", job_id)
        _finish(database, job_id, owner, JobStatus.FAILED, f"job failed: {e}", error=f"{type(e).__name__}: {e}")
        return
    finally:
        beat.stopped.set()
        if in_main_thread:
            signal.signal(HAND_BACK_SIGNAL, previous)
    if metrics is not None:
        _finish(database, job_id, owner, JobStatus.SUCCEEDED, f"job succeeded at step {step}",
                data={"metrics": metrics})
    elif reporter.stop_reason == StopReason.CANCELLED:
        _finish(database, job_id, owner, JobStatus.CANCELLED, f"job cancelled at step {step}")
    elif reporter.stop_reason == StopReason.SHUTDOWN:
        with database.session() as session:
            handed_back = jobs.hand_back(session, job_id, owner, f"worker shutting down: job re-queued at step {step}")
        if handed_back:
            JobQueue(settings).send(job_id)
    # StopReason.LEASE_LOST: whoever holds the job now ends it


def _train(database: Database, settings: Settings, job: Job, reporter: JobReporter) -> tuple[dict | None, int]:
    """Train the job from its latest checkpoint, if any: (the final metrics, or None if stopped; the step)."""
    with database.session() as session:
        corpus_ids = [i for i in (job.corpus_id, job.validation_corpus_id) if i]
        corpora = dict(session.execute(select(Corpus.id, Corpus.format).where(Corpus.id.in_(corpus_ids))).all())
        base = session.get(Checkpoint, job.base_checkpoint_id) if job.base_checkpoint_id else None
        resume = _resume_point(session, job.id, settings)
    plan = plan_job(job, settings.storage, corpora, base.path if base else None)
    trainer = Trainer(plan.model, plan.objective, plan.config, plan.tokenizer,
                      settings.storage.job_checkpoints_dir(job.id),
                      reporter, seed=job.seed, label_names=plan.label_names, lora=plan.lora,
                      parent=base.id if base else None, prompt_format=plan.prompt_format)
    if resume is not None:
        resume_dir = settings.storage.checkpoint_dir(resume.path)
        _load_weights(plan.model, resume_dir)
        trainer.resume(resume_dir)
        reporter.event("resume", f"resumed from the checkpoint at step {resume.step}",
                       {"checkpoint_id": resume.id, "step": resume.step})
    result = trainer.train()
    reporter.flush()
    return (result.metrics if result.status == "completed" else None), result.step


def _stop_also_on(shutdown: threading.Event, reporter: JobReporter):
    checks_database = reporter.should_stop

    def should_stop() -> bool:
        if shutdown.is_set() and reporter.stop_reason is None:
            reporter.stop_reason = StopReason.SHUTDOWN
        return checks_database() or reporter.stop_reason is not None

    return should_stop


def _load_weights(model, path) -> None:
    loaded, _, _ = load_checkpoint(path)
    model.load_state_dict(loaded.state_dict())
