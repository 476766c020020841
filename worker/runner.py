"""Running one job in a worker process: take its lease, train or evaluate, report, and end it in exactly one
state."""

import logging
import signal
import threading
import time

from core import jobs
from core.checkpoints import checkpoints_to_keep
from core.db import Database
from core.jobs import JobStatus, JobType
from core.queue import JobQueue
from core.settings import Settings
from core.tables import Job
from worker.evaluation import evaluate
from worker.handback import HAND_BACK_SIGNAL
from worker.ranks import RankDied, RankFailed, free_port, run_ranks
from worker.reporting import JobReporter, StopReason, retrying, stop_also_on
from worker.training import job_devices, prepare_data, train_job, training_inputs

log = logging.getLogger(__name__)
PART_POLL_S = 0.5

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
        parts = jobs.parts(session, job_id)
    if handed_back:
        JobQueue(settings).send(job_id, parts)


def _train(database: Database, settings: Settings, job: Job, reporter: JobReporter,
           shutdown: threading.Event) -> tuple[dict | None, int]:
    """Train the job from its latest checkpoint, if any, on one device here or on several in rank processes:
    (the final metrics, or None if stopped; the step)."""
    with database.session() as session:
        inputs = training_inputs(session, settings.storage, job)
    devices, nodes = job_devices(job.spec, settings.worker_concurrency), jobs.nodes(job.spec)
    if inputs.resume_id is not None:
        reporter.event("resume", f"resumed from the checkpoint at step {inputs.resume_step}",
                       {"checkpoint_id": inputs.resume_id, "step": inputs.resume_step})
    if len(devices) == 1 and nodes == 1:
        result = train_job(settings.storage, job, inputs, reporter, devices[0])
        if result.stopped_early:
            reporter.stopped_early(result.step, job.spec["hyperparameters"]["patience"])
        reporter.flush()
        return (result.metrics if result.status == "completed" else None), result.step
    prepare_data(job, settings.storage, inputs)  # once, before the ranks read it
    if nodes == 1:
        reporter.event("devices", f"training on {len(devices)} devices: {', '.join(devices)}", {"devices": devices})
        outcome = run_ranks(settings, job.id, reporter.owner, devices, shutdown)
    else:
        outcome = run_ranks(settings, job.id, reporter.owner, devices, shutdown, world=nodes * len(devices),
                            master=_rendezvous(database, settings, job.id, reporter, nodes, devices))
    reporter.stop_reason = outcome.stop_reason and StopReason(outcome.stop_reason)
    return outcome.metrics, outcome.step


def _rendezvous(database: Database, settings: Settings, job_id: str, reporter: JobReporter, nodes: int,
                devices: list[str]) -> tuple[str, int]:
    """Part 0 of a job across machines: where its ranks and the other parts' meet, published for the parts."""
    if not settings.node_address:
        raise ValueError("a job on several nodes needs SCRATCHLLM_NODE_ADDRESS on its workers: the address the "
                         "other machines reach this one at")
    master = (settings.node_address, free_port(settings.node_address))
    rendezvous = f"{master[0]}:{master[1]}"
    with database.session() as session:
        if not jobs.publish_rendezvous(session, job_id, reporter.owner, rendezvous):
            raise ValueError("the job's lease was lost before its parts could meet")
    reporter.event("devices", f"training on {nodes} nodes x {len(devices)} devices, meeting at {rendezvous}",
                   {"nodes": nodes, "devices": devices, "rendezvous": rendezvous})
    return master


def run_part(settings: Settings, job_id: str, owner: str, part: int) -> None:
    """A part (> 0) of a job across machines: wait for part 0 to say where the attempt's ranks meet, take the
    part (one worker alone does), and run its ranks there. Until a worker has taken part 0, the part is sent
    again rather than waited for here, so that a worker busy with it does not keep part 0 from starting. Part 0
    speaks for the job: it reports, stops every rank, and ends the job, also when a rank of this part dies."""
    database = _database(settings)
    deadline = time.monotonic() + settings.distributed_timeout_s
    while True:
        with database.session() as session:
            status, attempt, rendezvous = jobs.rendezvous_of(session, job_id)
        if status not in jobs.ACTIVE:
            log.info("job %s is %s: part %d has nothing to run", job_id, status, part)
            return
        if status == JobStatus.QUEUED:  # part 0 not taken yet: free this slot for it (it may be this worker's)
            time.sleep(PART_POLL_S)
            JobQueue(settings).send_part(job_id, part)
            return
        if rendezvous is not None:
            break
        if time.monotonic() > deadline:
            log.warning("job %s: part 0 did not start within %.0f s; part %d gives up", job_id,
                        settings.distributed_timeout_s, part)
            return
        time.sleep(PART_POLL_S)
    with database.session() as session:
        if not jobs.take_part(session, job_id, attempt, part, owner):
            log.info("job %s: part %d of attempt %d is another worker's", job_id, part, attempt)
            return
        spec = session.get(Job, job_id).spec
    devices = job_devices(spec, settings.worker_concurrency)
    host, port = rendezvous.rsplit(":", 1)
    try:
        run_ranks(settings, job_id, owner, devices, threading.Event(), first_rank=part * len(devices),
                  world=jobs.nodes(spec) * len(devices), master=(host, int(port)))
    except (RankFailed, RankDied) as e:  # part 0's collectives fail too, and it ends the job
        log.warning("job %s, part %d: %s", job_id, part, e)
