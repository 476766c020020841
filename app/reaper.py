"""The reaper: a running job whose worker went silent is put back in the queue and sent again.

A worker SIGKILLed under the filesystem transport loses the message it held; under Redis it comes back
only after the visibility timeout. The database notices first: the job's heartbeat goes stale.
"""

import asyncio
import logging

from core import jobs
from core.db import Database
from core.queue import JobQueue
from core.settings import Settings

log = logging.getLogger(__name__)


def requeue_stale_jobs(database: Database, queue: JobQueue, settings: Settings) -> list[str]:
    with database.session() as session:
        requeued = jobs.requeue_stale(session, settings.heartbeat_timeout_s)
    for job_id in requeued:
        queue.send(job_id)
    return requeued


async def reap_forever(database: Database, queue: JobQueue, settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.heartbeat_interval_s)
        try:
            requeued = await asyncio.to_thread(requeue_stale_jobs, database, queue, settings)
        except Exception:  # the database or broker is away for a moment: try again next round
            log.exception("reaper round failed")
            continue
        if requeued:
            log.warning("re-queued jobs of silent workers: %s", ", ".join(requeued))
