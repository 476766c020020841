"""A job's lease in the database: at most one worker runs a job, and a silent worker loses it.

Every change of a job's state is one conditional UPDATE, so two workers (or a worker and the reaper)
racing for the same job cannot both win.
"""

from datetime import timedelta

from sqlalchemy import or_, update

from app.db import Database, utcnow
from app.models import Job, JobEvent


def claim(database: Database, job_id: str, owner: str, timeout_s: float) -> bool:
    """Take the job if it is queued, or running under a lease whose heartbeat is older than timeout_s."""
    now = utcnow()
    with database.session() as session:
        taken = session.execute(update(Job).where(
            Job.id == job_id, Job.cancel_requested.is_(False),
            or_(Job.status == "queued",
                (Job.status == "running") & (Job.heartbeat_at < now - timedelta(seconds=timeout_s))),
        ).values(status="running", lease_owner=owner, heartbeat_at=now, attempts=Job.attempts + 1,
                 started_at=now)).rowcount
        if taken:
            session.add(JobEvent(job_id=job_id, type="status", message=f"job running on {owner}",
                                 data={"status": "running", "worker": owner}))
        return bool(taken)


def heartbeat(database: Database, job_id: str, owner: str) -> bool:
    """Renew the lease; False when it is no longer ours."""
    with database.session() as session:
        return bool(session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                                      Job.status == "running").values(heartbeat_at=utcnow())).rowcount)


def release(database: Database, job_id: str, owner: str, status: str, message: str, error: str | None = None,
            data: dict | None = None) -> bool:
    """End our lease with a final status (or `queued` to hand the job to another worker)."""
    finished = utcnow() if status != "queued" else None
    with database.session() as session:
        done = session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner,
                                                 Job.status == "running").values(
            status=status, lease_owner=None, error=error, finished_at=finished, eta_s=None)).rowcount
        if done:
            session.add(JobEvent(job_id=job_id, type="status", level="error" if error else "info", message=message,
                                 data={"status": status, **(data or {})}))
        return bool(done)
