"""A job on several devices: one process per rank, started the way torchrun starts them (env:// rendezvous:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and watched by the worker's pool process, which keeps
the job's lease. Each rank plans the job and trains it (torch.distributed, NCCL on GPUs, gloo on the CPU);
rank 0 reports as a job on one device does and speaks for all (cancel, lost lease, the worker's shutdown).

A rank that raises ends the job with its error. A rank that dies without one (killed, out of memory) takes the
others down with it, and the job goes back to the queue. A rank that hangs is ended by the collectives'
timeout (distributed_timeout_s).
"""

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from core.processes import start_child
from core.settings import Settings, settings_from_environment
from worker.handback import HAND_BACK_SIGNAL

DEVICE_ENV = "SCRATCHLLM_RANK_DEVICE"
POLL_S = 0.2
log = logging.getLogger(__name__)


class RankFailed(Exception):
    """A rank raised: the job fails with its error."""


class RankDied(Exception):
    """A rank ended without saying why (a signal, the out-of-memory killer): the job goes back to the queue."""


@dataclass
class RankOutcome:
    """What rank 0 reported at its end."""

    metrics: dict | None  # the final metrics; None if the job stopped early
    step: int
    stop_reason: str | None


def _outcome_file(settings: Settings, job_id: str, rank: int) -> Path:
    return settings.storage.job_work_dir(job_id) / f"rank-{rank}.json"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def run_ranks(settings: Settings, job_id: str, owner: str, devices: list[str], shutdown: threading.Event, *,
              first_rank: int = 0, world: int | None = None,
              master: tuple[str, int] | None = None) -> RankOutcome | None:
    """Train the job on one process per device, ranks first_rank on of world (default: these alone), meeting at
    master (default: a free port here), and wait for them. The worker shutting down (shutdown) is passed to
    rank 0, which stops every rank at a step boundary. Rank 0's outcome, or None for a part without it."""
    here = range(first_rank, first_rank + len(devices))
    for rank in here:
        _outcome_file(settings, job_id, rank).unlink(missing_ok=True)
    address, port = master or ("127.0.0.1", free_port())
    interface = {name: settings.distributed_interface for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
                 if settings.distributed_interface}
    ranks = []
    for local_rank, (rank, device) in enumerate(zip(here, devices, strict=True)):
        env = {**os.environ, **interface, "RANK": str(rank), "LOCAL_RANK": str(local_rank),
               "WORLD_SIZE": str(world or len(devices)), "MASTER_ADDR": address, "MASTER_PORT": str(port),
               DEVICE_ENV: device}
        ranks.append(start_child([sys.executable, "-m", "worker.ranks", job_id, owner], signal.SIGKILL, env=env))
    passed_on = False
    try:
        while any(process.poll() is None for process in ranks):
            if shutdown.is_set() and not passed_on:
                ranks[0].send_signal(HAND_BACK_SIGNAL)
                passed_on = True
            if any(process.returncode not in (None, 0) for process in ranks):
                break  # the others would wait for it until the collectives' timeout
            time.sleep(POLL_S)
    finally:
        ended = [process.returncode for process in ranks]
        for process in ranks:
            if process.poll() is None:
                process.kill()
            process.wait()
    return _outcome(settings, job_id, dict(zip(here, ended, strict=True)), world or len(devices))


def _outcome(settings: Settings, job_id: str, returncodes: dict[int, int | None], world: int) -> RankOutcome | None:
    reports = {}
    for rank, code in returncodes.items():
        path = _outcome_file(settings, job_id, rank)
        if path.is_file():
            reports[rank] = json.loads(path.read_text())
        elif code not in (None, 0):
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            raise RankDied(f"rank {rank} of {world} died ({how})")
    errors = [f"rank {rank}: {report['error']}" for rank, report in reports.items() if "error" in report]
    if errors:
        raise RankFailed("; ".join(errors))
    if 0 not in returncodes:
        return None
    if 0 not in reports:
        raise RankDied(f"rank 0 of {world} ended without a result")
    return RankOutcome(reports[0]["metrics"], reports[0]["step"], reports[0]["stop_reason"])


def _train_rank(settings: Settings, job_id: str, owner: str, rank: int, device: str,
                shutdown: threading.Event) -> dict:
    import torch
    import torch.distributed as dist

    from core.checkpoints import checkpoints_to_keep
    from core.db import Database
    from core.tables import Job
    from model import Callback
    from worker.reporting import JobReporter, stop_also_on
    from worker.training import train_job, training_inputs

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=timedelta(seconds=settings.distributed_timeout_s))
    database = Database(settings.sqlalchemy_url)
    try:
        with database.session() as session:
            job = session.get(Job, job_id)
            inputs = training_inputs(session, settings.storage, job)
        reporter = JobReporter(database, job_id, owner, settings.storage,
                               checkpoints_to_keep(job.spec, settings.checkpoints_kept)) if rank == 0 else None
        if reporter is not None:
            reporter.should_stop = stop_also_on(shutdown, reporter)
        result = train_job(settings.storage, job, inputs, reporter or Callback(), device)
        if reporter is not None:
            if result.stopped_early:
                reporter.stopped_early(result.step, job.spec["hyperparameters"]["patience"])
            reporter.flush()
        return {"metrics": result.metrics if result.status == "completed" else None, "step": result.step,
                "stop_reason": reporter.stop_reason if reporter else None}
    finally:
        dist.destroy_process_group()
        database.dispose()


def main() -> None:
    job_id, owner = sys.argv[1], sys.argv[2]
    rank = int(os.environ["RANK"])
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    settings = settings_from_environment()
    shutdown = threading.Event()
    signal.signal(HAND_BACK_SIGNAL, lambda *_: shutdown.set())
    result = _outcome_file(settings, job_id, rank)
    try:
        outcome = _train_rank(settings, job_id, owner, rank, os.environ[DEVICE_ENV], shutdown)
    except Exception as e:
        log.exception("rank %d of job %s failed", rank, job_id)
        result.write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)
    if rank == 0:
        result.write_text(json.dumps(outcome))


if __name__ == "__main__":
    main()
