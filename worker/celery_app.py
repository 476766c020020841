"""The Celery application of the worker: `scratchllm worker` runs it.

The worker's main process never imports torch (a torch op before fork() hangs the child); the task
imports the training code when it runs, in the pool's child process.
"""

import contextlib
import logging
import os
import signal
from pathlib import Path

from celery.signals import worker_ready

from core.queue import RUN_JOB_TASK, make_celery
from core.settings import settings_from_environment
from worker.handback import HAND_BACK_SIGNAL

log = logging.getLogger(__name__)
settings = settings_from_environment()
celery = make_celery(settings)


@celery.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str, part: int = 0) -> None:
    """Run the job, or (part > 0) this machine's part of a job across several (core.jobs.nodes)."""
    from worker.runner import run, run_part

    owner = f"{self.request.hostname}:{self.request.id}"
    if part == 0:
        run(settings, job_id, owner)
    else:
        run_part(settings, job_id, owner, part)


@worker_ready.connect
def hand_back_jobs_on_shutdown(**_) -> None:
    """Before Celery's own shutdown handling (whose soft shutdown waits for the running job), ask each
    pool process to checkpoint its job and re-queue it, so the wait ends after one training step."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        celery_handler = signal.getsignal(sig)

        def handler(signum, frame, celery_handler=celery_handler):
            children = _child_pids()
            log.warning("worker shutting down: asking %d pool process(es) to hand their jobs back", len(children))
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, HAND_BACK_SIGNAL)
            if callable(celery_handler):
                celery_handler(signum, frame)

        signal.signal(sig, handler)


def _child_pids() -> list[int]:
    """This process's children, from Linux's /proc (billiard does not list its pool's processes)."""
    pids = []
    for children in Path("/proc/self/task").glob("*/children"):
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in children.read_text().split()]
    return pids
