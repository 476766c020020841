"""The reaper: a running job whose worker went silent is put back in the queue and sent again.

A worker SIGKILLed under the filesystem transport loses the message it held; under Redis it comes back
only after the visibility timeout. The database notices first: the job's heartbeat goes stale.
"""

import asyncio
import logging
from datetime import timedelta

from celery import Celery
from sqlalchemy import select, update

from app.db import Database, utcnow
from app.models import Job, JobEvent
from app.queue import enqueue_job
from app.settings import Settings

log = logging.getLogger(__name__)


def requeue_stale_jobs(database: Database, celery: Celery, settings: Settings) -> list[str]:
    cutoff = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s)
    requeued = []
    with database.session() as session:
        stale = session.execute(select(Job.id, Job.lease_owner).where(Job.status == "running",
                                                                       Job.heartbeat_at < cutoff)).all()
        for job_id, owner in stale:
            taken = session.execute(update(Job).where(Job.id == job_id, Job.status == "running",
                                                      Job.lease_owner == owner, Job.heartbeat_at < cutoff)
                                    .values(status="queued", lease_owner=None)).rowcount
            if taken:
                session.add(JobEvent(job_id=job_id, type="status", level="warning",
                                     message=f"worker {owner} went silent; job re-queued to resume from its last "
                                             f"checkpoint", data={"status": "queued"}))
                requeued.append(job_id)
    for job_id in requeued:
        enqueue_job(celery, settings, job_id)
    return requeued


async def reap_forever(database: Database, celery: Celery, settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.heartbeat_interval_s)
        try:
            requeued = await asyncio.to_thread(requeue_stale_jobs, database, celery, settings)
        except Exception:  # the database or broker is away for a moment: try again next round
            log.exception("reaper round failed")
            continue
        if requeued:
            log.warning("re-queued jobs of silent workers: %s", ", ".join(requeued))
