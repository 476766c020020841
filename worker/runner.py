"""Running one job in a worker process: take its lease, train or evaluate, report, and end it in exactly one
state."""

import logging
import signal
import threading

from core import jobs
from core.checkpoints import checkpoints_to_keep
from core.db import Database
from core.jobs import JobStatus, JobType
from core.queue import JobQueue
from core.settings import Settings
from core.tables import Job
from worker.evaluation import evaluate
from worker.handback import HAND_BACK_SIGNAL
from worker.ranks import RankDied, run_ranks
from worker.reporting import JobReporter, StopReason, retrying, stop_also_on
from worker.training import job_devices, prepare_data, train_job, training_inputs

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
        reporter = JobReporter(database, job_id, owner, settings.storage,
                               checkpoints_to_keep(job.spec, settings.checkpoints_kept))
        reporter.should_stop = stop_also_on(shutdown, reporter)
        if job.type == JobType.EVALUATE:
            metrics = evaluate(database, settings, job_id, reporter)
            step = reporter.progress.step if reporter.progress else 0
        else:
            metrics, step = _train(database, settings, job, reporter, shutdown)
    except RankDied as e:  # killed, not failing: the job goes back to the queue (the attempt cap applies)
        log.warning("job %s: %s", job_id, e)
        _hand_back(settings, database, job_id, owner, f"{e}: job re-queued")
        return
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
        _hand_back(settings, database, job_id, owner, f"worker shutting down: job re-queued at step {step}")
    # StopReason.LEASE_LOST: whoever holds the job now ends it


def _hand_back(settings: Settings, database: Database, job_id: str, owner: str, message: str) -> None:
    with database.session() as session:
        handed_back = jobs.hand_back(session, job_id, owner, message)
    if handed_back:
        JobQueue(settings).send(job_id)


def _train(database: Database, settings: Settings, job: Job, reporter: JobReporter,
           shutdown: threading.Event) -> tuple[dict | None, int]:
    """Train the job from its latest checkpoint, if any, on one device here or on several in rank processes:
    (the final metrics, or None if stopped; the step)."""
    with database.session() as session:
        inputs = training_inputs(session, settings.storage, job)
    devices = job_devices(job.spec, settings.worker_concurrency)
    if inputs.resume_id is not None:
        reporter.event("resume", f"resumed from the checkpoint at step {inputs.resume_step}",
                       {"checkpoint_id": inputs.resume_id, "step": inputs.resume_step})
    if len(devices) == 1:
        result = train_job(settings.storage, job, inputs, reporter, devices[0])
        if result.stopped_early:
            reporter.stopped_early(result.step, job.spec["hyperparameters"]["patience"])
        reporter.flush()
        return (result.metrics if result.status == "completed" else None), result.step
    prepare_data(job, settings.storage, inputs)  # once, before the ranks read it
    reporter.event("devices", f"training on {len(devices)} devices: {', '.join(devices)}", {"devices": devices})
    outcome = run_ranks(settings, job.id, reporter.owner, devices, shutdown)
    reporter.stop_reason = outcome.stop_reason and StopReason(outcome.stop_reason)
    return outcome.metrics, outcome.step
