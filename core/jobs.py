"""The job lifecycle: a job's states and every transition between them, each one conditional UPDATE written
together with its event row, so two workers, a worker and the reaper, or a worker and the API racing for the
same job can never both win.

    create          -> queued
    queued          -> queued      resend_unclaimed (still queued long after it was sent: its message may be lost)
    queued          -> running     claim (also a running job whose lease went stale: a redelivered message)
    queued          -> cancelled   request_cancel (a running job is only asked: its worker finishes it)
    queued          -> failed      fail_unqueued (the broker refused the job); claim, at the attempt cap
    running         -> running     heartbeat (renews the lease; tells a worker it was cancelled or lost the job)
    running         -> succeeded | failed | cancelled   finish
    running         -> queued      hand_back (a worker shutting down), requeue_stale (a worker gone silent)
    running         -> cancelled   hand_back and requeue_stale, when the job was being cancelled
    running         -> failed      requeue_stale and claim, at the attempt cap (the job may be killing its workers)

Sending a queued job to the workers is the caller's: core.queue.JobQueue, after the transition commits; every
transition to queued stamps sent_at for that send. Lease times are the database's clock (core.db.database_now):
the clocks of the machines that stamp and judge them may disagree.
"""

from enum import StrEnum

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import database_now
from core.enums import CorpusKind
from core.errors import Conflict
from core.tables import Job, JobEvent, JobPart


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
    FINETUNE_DPO = "finetune_dpo"  # preference tuning of an instruction model
    EVALUATE = "evaluate"  # created by an evaluation request, never directly


TRAINING = (JobType.PRETRAIN, JobType.FINETUNE_CLASSIFIER, JobType.FINETUNE_INSTRUCT, JobType.FINETUNE_DPO)
CORPUS_KIND = {JobType.PRETRAIN: CorpusKind.TEXT, JobType.FINETUNE_CLASSIFIER: CorpusKind.CLASSIFICATION,
               JobType.FINETUNE_INSTRUCT: CorpusKind.INSTRUCTION,
               JobType.FINETUNE_DPO: CorpusKind.PREFERENCE}  # what each training job learns from


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
    job = Job(status=JobStatus.QUEUED, sent_at=database_now(), **columns)
    session.add(job)
    session.flush()
    _event(session, job.id, message, JobStatus.QUEUED)
    return job


def fail_unqueued(session: Session, job_id: str, error: str) -> bool:
    """A queued job the broker did not take fails at once: it must not sit queued forever."""
    done = session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(
        status=JobStatus.FAILED, error=error, finished_at=database_now())).rowcount
    if done:
        _event(session, job_id, error, JobStatus.FAILED, level="error")
    return bool(done)


def claim(session: Session, job_id: str, owner: str, timeout_s: float, max_attempts: int) -> bool:
    """Take the job if it is queued, or running under a lease whose heartbeat is older than timeout_s; one that
    already started max_attempts times fails instead (a job left queued at the cap would wait forever)."""
    takeable = (Job.id == job_id, Job.cancel_requested.is_(False),
                or_(Job.status == JobStatus.QUEUED,
                    (Job.status == JobStatus.RUNNING) & (Job.heartbeat_at < database_now(-timeout_s))))
    now = database_now()
    if session.execute(update(Job).where(*takeable, Job.attempts < max_attempts).values(
            status=JobStatus.RUNNING, lease_owner=owner, heartbeat_at=now, attempts=Job.attempts + 1,
            started_at=now)).rowcount:
        _event(session, job_id, f"job running on {owner}", JobStatus.RUNNING, data={"worker": owner})
        return True
    error = f"the job reached the attempt cap ({max_attempts} starts) and may not start again"
    if session.execute(update(Job).where(*takeable, Job.attempts >= max_attempts).values(
            status=JobStatus.FAILED, lease_owner=None, eta_s=None, error=error, finished_at=now)).rowcount:
        _event(session, job_id, error, JobStatus.FAILED, level="error")
    return False


def heartbeat(session: Session, job_id: str, owner: str, **progress) -> Lease:
    """Renew the lease, writing the progress columns given (step, tokens_seen, train_loss, ...)."""
    cancel_requested = session.scalar(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
        .values(heartbeat_at=database_now(), **progress).returning(Job.cancel_requested))
    if cancel_requested is None:
        return Lease.LOST
    return Lease.CANCEL_REQUESTED if cancel_requested else Lease.HELD


def request_cancel(session: Session, job: Job) -> None:
    """A queued job is cancelled at once; a running one is asked to stop, and its worker finishes it."""
    if job.status in FINISHED:
        raise JobFinished(job)
    # conditional: a worker may be taking the job at this very moment
    cancelled = session.execute(update(Job).where(Job.id == job.id, Job.status == JobStatus.QUEUED).values(
        status=JobStatus.CANCELLED, cancel_requested=True, finished_at=database_now())).rowcount
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
        status=status, lease_owner=None, error=error, finished_at=database_now(), eta_s=None)).rowcount
    if done:
        _event(session, job_id, message, status, level="error" if error else "info", data=data)
    return bool(done)


def hand_back(session: Session, job_id: str, owner: str, message: str) -> bool:
    """Give a running job back to the queue (its worker is shutting down): True when re-queued, to send again
    once committed; a job being cancelled ends cancelled instead."""
    ours = (Job.id == job_id, Job.lease_owner == owner, Job.status == JobStatus.RUNNING)
    if session.execute(update(Job).where(*ours, Job.cancel_requested.is_(True)).values(
            status=JobStatus.CANCELLED, lease_owner=None, eta_s=None, finished_at=database_now())).rowcount:
        _event(session, job_id, "job cancelled as its worker shut down", JobStatus.CANCELLED)
        return False
    done = session.execute(update(Job).where(*ours).values(status=JobStatus.QUEUED, lease_owner=None, eta_s=None,
                                                           sent_at=database_now())).rowcount
    if done:
        _event(session, job_id, message, JobStatus.QUEUED)
    return bool(done)


def requeue_stale(session: Session, timeout_s: float, max_attempts: int) -> list[str]:
    """Put back in the queue every running job whose worker has been silent for timeout_s (one that was being
    cancelled ends cancelled, one on its last attempt fails); the ids of the re-queued, to send again once
    committed."""
    stale = (Job.status == JobStatus.RUNNING, Job.heartbeat_at < database_now(-timeout_s))
    requeued = []
    for job_id, owner, cancelling, attempts in session.execute(
            select(Job.id, Job.lease_owner, Job.cancel_requested, Job.attempts).where(*stale)).all():
        status, message, columns = _after_silence(owner, cancelling, attempts, max_attempts)
        taken = session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                                  Job.attempts == attempts, *stale)
                                .values(status=status, lease_owner=None, eta_s=None, **columns)).rowcount
        if not taken:
            continue
        _event(session, job_id, message, status, level="error" if status == JobStatus.FAILED else "warning")
        if status == JobStatus.QUEUED:
            requeued.append(job_id)
    return requeued


def _after_silence(owner: str, cancelling: bool, attempts: int, max_attempts: int) -> tuple[JobStatus, str, dict]:
    """What becomes of a running job whose worker went silent: its status, its event's message, its columns."""
    if cancelling:
        return (JobStatus.CANCELLED, f"worker {owner} went silent while the job was being cancelled; job cancelled",
                {"finished_at": database_now()})
    if attempts >= max_attempts:
        # a job that kills its worker (out of memory, say) would otherwise kill one every heartbeat timeout
        error = (f"its worker went silent on attempt {attempts}, the attempt cap ({max_attempts} starts): "
                 "the job may be what kills its workers, e.g. by running out of memory")
        return JobStatus.FAILED, f"worker {owner} went silent; job failed: {error}", {
            "error": error, "finished_at": database_now()}
    return (JobStatus.QUEUED, f"worker {owner} went silent; job re-queued to resume from its last checkpoint",
            {"sent_at": database_now()})


def resend_unclaimed(session: Session, after_s: float) -> list[str]:
    """The ids of the jobs still queued after_s after they were sent, to send again once committed: their
    message may be lost (a send that failed after its transition committed, a broker that dropped it). A job
    merely waiting for a free worker is sent twice, which claim makes harmless."""
    job_ids = session.scalars(update(Job).where(Job.status == JobStatus.QUEUED, Job.sent_at < database_now(-after_s))
                              .values(sent_at=database_now()).returning(Job.id)).all()
    for job_id in job_ids:
        _event(session, job_id, f"job still queued {after_s:g} s after it was sent; sent again", type_="resend",
               level="warning")
    return job_ids


def nodes(spec: dict) -> int:
    """The machines a job trains on (its spec's `nodes`): it is sent as one message, a part, for each."""
    return spec.get("nodes", 1)


def parts(session: Session, job_id: str) -> int:
    return nodes(session.scalar(select(Job.spec).where(Job.id == job_id)) or {})


def publish_rendezvous(session: Session, job_id: str, owner: str, rendezvous: str) -> bool:
    """Part 0 of a job across several machines: say where the current attempt's ranks meet (host:port), while
    owner holds the job's lease."""
    job = session.get(Job, job_id)
    if job is None or job.lease_owner != owner or job.status != JobStatus.RUNNING:
        return False
    session.add(JobPart(job_id=job_id, attempt=job.attempts, part=0, owner=owner, rendezvous=rendezvous))
    return True


def rendezvous_of(session: Session, job_id: str) -> tuple[str | None, int, str | None]:
    """(the job's status, its attempt, where that attempt's ranks meet if part 0 said so yet)."""
    job = session.get(Job, job_id)
    if job is None:
        return None, 0, None
    address = session.scalar(select(JobPart.rendezvous).where(JobPart.job_id == job_id, JobPart.part == 0,
                                                              JobPart.attempt == job.attempts))
    return job.status, job.attempts, address


def take_part(session: Session, job_id: str, attempt: int, part: int, owner: str) -> bool:
    """Take a part (> 0) of an attempt; False if another worker took it (a message delivered twice)."""
    try:
        with session.begin_nested():
            session.add(JobPart(job_id=job_id, attempt=attempt, part=part, owner=owner))
    except IntegrityError:
        return False
    _event(session, job_id, f"part {part} running on {owner}", type_="part", data={"part": part, "worker": owner})
    return True
