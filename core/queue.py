"""The job queue: Celery's configuration, shared by the API and the worker, and sending a job by task name.

The API never imports the worker; it sends the task by its name. The database is the source of truth
for jobs: the broker only delivers "run job X", and a job whose message was lost is sent again.
"""

from celery import Celery

from core.settings import Settings

RUN_JOB_TASK = "scratchllm.run_job"
# longer than any training run: Redis redelivers an unacknowledged message after this (the job's lease
# in the database keeps a redelivered job from running twice anyway)
VISIBILITY_TIMEOUT_S = 7 * 24 * 3600


def celery_config(settings: Settings) -> dict:
    config = {
        "broker_url": settings.celery_broker_url,
        "task_default_queue": settings.training_queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_ignore_result": True,
        "worker_prefetch_multiplier": 1,
        "worker_soft_shutdown_timeout": settings.worker_soft_shutdown_s,
        "worker_enable_soft_shutdown_on_idle": False,  # an idle worker stops at once
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
    }
    if config["broker_url"].startswith("filesystem://"):
        folder = str(settings.storage.broker)
        # one host: the in and out folders must be the same folder
        config["broker_transport_options"] = {"data_folder_in": folder, "data_folder_out": folder,
                                              "control_folder": str(settings.storage.broker_control),
                                              "polling_interval": settings.broker_polling_interval_s}
        # task events would leave bindings of dead receivers behind in the broker folder
        config["worker_send_task_events"] = False
        config["task_send_sent_event"] = False
        config["broker_transport"] = "core.broker:Transport"  # kombu's, with messages written whole
    else:
        config["broker_transport_options"] = {"visibility_timeout": VISIBILITY_TIMEOUT_S}
    return config


def make_celery(settings: Settings) -> Celery:
    if settings.celery_broker_url.startswith("filesystem://"):
        settings.storage.broker.mkdir(parents=True, exist_ok=True)
    celery = Celery("scratchllm")
    celery.conf.update(celery_config(settings))
    return celery


def clear_stale_bindings(settings: Settings) -> None:
    """Forget the fanout bindings (remote control, events) of consumers that died without unbinding;
    the filesystem transport would otherwise keep copying messages for them into files nobody reads."""
    for table in settings.storage.broker_control.glob("*.exchange"):
        if table.name.startswith(("celery.pidbox", "celeryev", "reply.celery.pidbox")):
            table.unlink(missing_ok=True)


class JobQueue:
    """Sends "run job X" to the workers of the training queue."""

    def __init__(self, settings: Settings, celery: Celery | None = None):
        self.celery = celery or make_celery(settings)
        self.queue = settings.training_queue

    def send(self, job_id: str, parts: int = 1) -> None:
        """One message per part: a job across several machines has a part for each (core.jobs.parts)."""
        for part in range(parts):
            self.send_part(job_id, part)

    def send_part(self, job_id: str, part: int) -> None:
        self.celery.send_task(RUN_JOB_TASK, args=[job_id, part], queue=self.queue)
