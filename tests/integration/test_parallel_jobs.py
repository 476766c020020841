"""Jobs on several devices through the service: a real worker on PostgreSQL and Redis trains a job on two CPU
processes (gloo), as it would on two GPUs (NCCL). Rank 0 alone reports; a cancel stops every rank; a rank
killed hands the job back, and it resumes."""

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_service_flow import (
    checkpoint_paths,
    metric_rows,
    pretrain_request,
    service,  # noqa: F401 (the fixtures, asked for by name below)
    service_env,  # noqa: F401
)

pytestmark = pytest.mark.parametrize("service", ["postgresql+redis"], indirect=True)


def rank_processes(job_id: str) -> dict[int, int]:
    """rank -> pid of the live rank processes of a job."""
    ranks = {}
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            if b"worker.ranks" not in command or job_id.encode() not in command:
                continue
            variables = (proc / "environ").read_bytes().split(b"\0")
            environment = dict(line.split(b"=", 1) for line in variables if b"=" in line)
        except OSError:  # ended while we looked
            continue
        ranks[int(environment[b"RANK"])] = int(proc.name)
    return ranks


def losses(running, job_id: str) -> list[float]:
    points = running.client.get(f"/v1/jobs/{job_id}/metrics", params={"name": "train_loss"}).json()["data"]
    assert [p["step"] for p in points] == list(range(1, len(points) + 1))
    return [p["value"] for p in points]


def events(running, job_id: str) -> list[dict]:
    return running.client.get(f"/v1/jobs/{job_id}/events").json()["data"]


def test_a_job_on_two_devices_takes_the_steps_of_one_and_rank_0_alone_reports(service, shared_data):  # noqa: F811
    service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    request = pretrain_request(verdict, max_steps=8, grad_accum_steps=2, checkpoint_interval=4, eval_interval=4)
    one = service.submit(**request)
    two = service.submit(**request, devices=2)
    for job in (one, two):
        assert service.wait_until_done(job["id"])["status"] == "succeeded"
    assert np.allclose(losses(service, two["id"]), losses(service, one["id"]), rtol=1e-4)
    assert metric_rows(service.settings, two["id"], "train_loss") == 8
    assert metric_rows(service.settings, two["id"], "val_loss") == 2
    assert [e["data"]["devices"] for e in events(service, two["id"]) if e["type"] == "devices"] == [["cpu", "cpu"]]
    storage = service.settings.storage
    directories = {storage.relative(d) for d in storage.job_checkpoints_dir(two["id"]).iterdir()}
    assert checkpoint_paths(service.settings, two["id"]) == directories and len(directories) == 2
    assert rank_processes(two["id"]) == {}


def two_device_job_running(running, shared_data, steps: int, checkpoint_interval: int, past_step: int) -> dict:
    """A worker, and a pretraining job on two devices that has passed past_step."""
    running.start_worker()
    verdict = running.upload(shared_data / "the-verdict.txt", "text")
    job = running.submit(**pretrain_request(verdict, max_steps=steps, grad_accum_steps=2,
                                            checkpoint_interval=checkpoint_interval, eval_interval=0), devices=2)
    return running.wait_for(job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= past_step)


def test_a_cancel_stops_every_rank_within_seconds(service, shared_data):  # noqa: F811
    job = two_device_job_running(service, shared_data, steps=100_000, checkpoint_interval=0, past_step=2)
    assert sorted(rank_processes(job["id"])) == [0, 1]
    asked = time.monotonic()
    assert service.client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    done = service.wait_for(job["id"], lambda j: j["status"] == "cancelled", timeout_s=30)
    assert time.monotonic() - asked < 15, "every rank should stop at its next step"
    assert rank_processes(job["id"]) == {}
    step = done["progress"]["step"]
    assert metric_rows(service.settings, job["id"], "train_loss") == step  # every step recorded once


def test_a_rank_killed_hands_the_job_back_and_it_resumes(service, shared_data):  # noqa: F811
    job = two_device_job_running(service, shared_data, steps=16, checkpoint_interval=4, past_step=6)
    os.kill(rank_processes(job["id"])[1], signal.SIGKILL)  # as the out-of-memory killer would
    done = service.wait_until_done(job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2
    messages = [e["message"] for e in events(service, job["id"])]
    assert any("rank 1 of 2 died (signal 9)" in m for m in messages), messages
    assert any(m.startswith("resumed from") for m in messages)
    assert metric_rows(service.settings, job["id"], "train_loss") == 16
    assert rank_processes(job["id"]) == {}
