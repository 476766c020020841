"""The job lifecycle: a job's states and every transition between them, each one conditional UPDATE written
together with its event row, so two workers, a worker and the reaper, or a worker and the API racing for the
same job can never both win.

    create          -> queued
    queued          -> running     claim (also a running job whose lease went stale: a redelivered message)
    queued          -> cancelled   request_cancel (a running job is only asked: its worker finishes it)
    queued          -> failed      fail_unqueued (the broker refused the job)
    running         -> running     heartbeat (renews the lease; tells a worker it was cancelled or lost the job)
    running         -> succeeded | failed | cancelled   finish
    running         -> queued      hand_back (a worker shutting down), requeue_stale (a worker gone silent)
    running         -> cancelled   hand_back and requeue_stale, when the job was being cancelled

Sending a queued job to the workers is the caller's: core.queue.JobQueue, after the transition commits.
"""

from datetime import timedelta
from enum import StrEnum

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from core.db import utcnow
from core.enums import CorpusKind
from core.errors import Conflict
from core.tables import Job, JobEvent


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class JobType(StrEnum):
    PRETRAIN = "pretrain"
    FINETUNE_CLASSIFIER = "finetune_classifier"
    FINETUNE_INSTRUCT = "finetune_instruct"
    EVALUATE = "evaluate"  # created by an evaluation request, never directly


TRAINING = (JobType.PRETRAIN, JobType.FINETUNE_CLASSIFIER, JobType.FINETUNE_INSTRUCT)
CORPUS_KIND = {JobType.PRETRAIN: CorpusKind.TEXT, JobType.FINETUNE_CLASSIFIER: CorpusKind.CLASSIFICATION,
               JobType.FINETUNE_INSTRUCT: CorpusKind.INSTRUCTION}  # what each training job learns from


class Lease(StrEnum):
    """What a heartbeat tells the worker holding a job."""

    HELD = "held"
    CANCEL_REQUESTED = "cancel_requested"  # go on to a clean stop, then finish the job cancelled
    LOST = "lost"  # the job was taken from this worker (presumed dead): stop, whoever holds it ends it


class JobFinished(Conflict):
    def __init__(self, job: Job):
        super().__init__(f"job {job.id} already ended {job.status}", param="job_id")


def _event(session: Session, job_id: str, message: str, status: JobStatus | None = None, *, type_: str = "status",
           level: str = "info", data: dict | None = None) -> None:
    if status is not None:
        data = {"status": status.value, **(data or {})}
    session.add(JobEvent(job_id=job_id, type=type_, level=level, message=message, data=data))


def create(session: Session, message: str = "job queued", **columns) -> Job:
    """A new queued job with the given columns, and its first event."""
    job = Job(status=JobStatus.QUEUED, **columns)
    session.add(job)
    session.flush()
    _event(session, job.id, message, JobStatus.QUEUED)
    return job


def fail_unqueued(session: Session, job_id: str, error: str) -> bool:
    """A queued job the broker did not take fails at once: it must not sit queued forever."""
    done = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(
        status=JobStatus.FAILED, error=error, finished_at=utcnow())).rowcount
    if done:
        _event(session, job_id, error, JobStatus.FAILED, level="error")
    return bool(done)


def claim(session: Session, job_id: str, owner: str, timeout_s: float) -> bool:
    """Take the job if it is queued, or running under a lease whose heartbeat is older than timeout_s."""
    now = utcnow()
    taken = session.execute(update(Job).where(
        Job.id == job_id, Job.cancel_requested.is_(False),
        or_(Job.status == JobStatus.QUEUED,
            (Job.status == JobStatus.RUNNING) & (Job.heartbeat_at < now - timedelta(seconds=timeout_s))),
    ).values(status=JobStatus.RUNNING, lease_owner=owner, heartbeat_at=now, attempts=Job.attempts + 1,
             started_at=now)).rowcount
    if taken:
        _event(session, job_id, f"job running on {owner}", JobStatus.RUNNING, data={"worker": owner})
    return bool(taken)


def heartbeat(session: Session, job_id: str, owner: str, **progress) -> Lease:
    """Renew the lease, writing the progress columns given (step, tokens_seen, train_loss, ...)."""
    cancel_requested = session.scalar(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
        .values(heartbeat_at=utcnow(), **progress).returning(Job.cancel_requested))
    if cancel_requested is None:
        return Lease.LOST
    return Lease.CANCEL_REQUESTED if cancel_requested else Lease.HELD


def request_cancel(session: Session, job: Job) -> None:
    """A queued job is cancelled at once; a running one is asked to stop, and its worker finishes it."""
    if job.status in FINISHED:
        raise JobFinished(job)
    # conditional: a worker may be taking the job at this very moment
    cancelled = session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED).values(
        status=JobStatus.CANCELLED, cancel_requested=True, finished_at=utcnow())).rowcount
    if cancelled:
        _event(session, job.id, "job cancelled before it started", JobStatus.CANCELLED)
    else:
        asked = session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.RUNNING).values(
            cancel_requested=True)).rowcount
        if not asked:  # it ended between the read and now
            session.refresh(job)
            raise JobFinished(job)
        _event(session, job.id, "cancellation requested", type_="cancel")
    session.flush()
    session.refresh(job)


def finish(session: Session, job_id: str, owner: str, status: JobStatus, message: str, *, error: str | None = None,
           data: dict | None = None) -> bool:
    """End the lease of a running job with its final status."""
    if status not in FINISHED:
        raise ValueError(f"{status} is not a final status")
    done = session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                             Job.status == JobStatus.RUNNING).values(
        status=status, lease_owner=None, error=error, finished_at=utcnow(), eta_s=None)).rowcount
    if done:
        _event(session, job_id, message, status, level="error" if error else "info", data=data)
    return bool(done)


def hand_back(session: Session, job_id: str, owner: str, message: str) -> bool:
    """Give a running job back to the queue (its worker is shutting down): True when re-queued, to send again
    once committed; a job being cancelled ends cancelled instead."""
    ours = (Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
    if session.execute(update(Job).where(*ours, Job.cancel_requested.is_(True)).values(
            status=JobStatus.CANCELLED, lease_owner=None, eta_s=None, finished_at=utcnow())).rowcount:
        _event(session, job_id, "job cancelled as its worker shut down", JobStatus.CANCELLED)
        return False
    done = session.execute(update(Job).where(*ours).values(status=JobStatus.QUEUED, lease_owner=None,
                                                           eta_s=None)).rowcount
    if done:
        _event(session, job_id, message, JobStatus.QUEUED)
    return bool(done)


def requeue_stale(session: Session, timeout_s: float) -> list[str]:
    """Put back in the queue every running job whose worker has been silent for timeout_s (one that was being
    cancelled ends cancelled instead); the ids of the re-queued, to send again once committed."""
    cutoff = utcnow() - timedelta(seconds=timeout_s)
    stale = session.execute(select(Job.id, Job.lease_owner, Job.cancel_requested).where(
        Job.status == JobStatus.RUNNING, Job.heartbeat_at < cutoff)).all()
    requeued = []
    for job_id, owner, cancelling in stale:
        status = JobStatus.CANCELLED if cancelling else JobStatus.QUEUED
        taken = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.RUNNING,
                                                  Job.lease_owner == owner, Job.heartbeat_at < cutoff)
                                .values(status=status, lease_owner=None, eta_s=None,
                                        finished_at=utcnow() if cancelling else None)).rowcount
        if not taken:
            continue
        if cancelling:
            _event(session, job_id, f"worker {owner} went silent while the job was being cancelled; job cancelled",
                   status, level="warning")
        else:
            _event(session, job_id, f"worker {owner} went silent; job re-queued to resume from its last checkpoint",
                   status, level="warning")
            requeued.append(job_id)
    return requeued
