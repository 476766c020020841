"""The reaper: a running job whose worker went silent is put back in the queue and sent again, and so is a
queued job whose message seems lost.

A worker SIGKILLed under the filesystem transport loses the message it held; under Redis it comes back
only after the visibility timeout. The database notices first: the job's heartbeat goes stale. A message
can be lost before any worker holds it too: a send that failed after its transition committed, a hand-back
during a broker outage. The job then stays queued, and its sent_at grows old.
"""

import asyncio
import logging

from core import jobs
from core.db import Database
from core.queue import JobQueue
from core.settings import Settings

log = logging.getLogger(__name__)


def reap_once(database: Database, queue: JobQueue, settings: Settings) -> tuple[list[str], list[str]]:
    """Send again the jobs of silent workers and the jobs whose message seems lost: (the ones, the others)."""
    with database.session() as session:
        requeued = jobs.requeue_stale(session, settings.heartbeat_timeout_s, settings.max_attempts)
        resent = jobs.resend_unclaimed(session, settings.resend_queued_after_s)
        parts = {job_id: jobs.parts(session, job_id) for job_id in requeued + resent}
    # a send that fails here leaves the job queued with a fresh sent_at: a later round sends it again
    for job_id, n in parts.items():
        queue.send(job_id, n)
    return requeued, resent


async def reap_forever(database: Database, queue: JobQueue, settings: Settings) -> None:
    while True:
        await asyncio.sleep(settings.heartbeat_interval_s)
        try:
            requeued, resent = await asyncio.to_thread(reap_once, database, queue, settings)
        except Exception:  # the database or broker is away for a moment: try again next round
            log.exception("reaper round failed")
            continue
        if requeued:
            log.warning("re-queued jobs of silent workers: %s", ", ".join(requeued))
        if resent:
            log.warning("sent again jobs queued too long: %s", ", ".join(resent))
