"""The Celery application of the worker: `scratchllm worker` runs it.

The worker's main process never imports torch (a torch op before fork() hangs the child); the task
imports the training code when it runs, in the pool's child process.
"""

from app.queue import RUN_JOB_TASK, make_celery
from app.settings import get_settings

settings = get_settings()
celery = make_celery(settings)


@celery.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> None:
    from worker.runner import run

    run(settings, job_id, owner=f"{self.request.hostname}:{self.request.id}")
