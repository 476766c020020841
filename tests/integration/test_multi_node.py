"""A job across two machines: two network namespaces joined by a veth pair stand in for two hosts, each with a
worker. The workers share the embedded service's database and broker through the filesystem (as machines would
share PostgreSQL and Redis); the job's ranks meet through torch.distributed's rendezvous at part 0's address,
across the veth, with gloo. The curve equals a one-process run's with the same global batch."""

import os
import secrets
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.integration.test_parallel_jobs import events, losses, rank_processes
from tests.integration.test_service_flow import (
    metric_rows,
    pretrain_request,
    service,  # noqa: F401 (the fixtures, asked for by name below)
    service_env,  # noqa: F401
)

pytestmark = pytest.mark.parametrize("service", ["embedded"], indirect=True)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    """[(namespace, address, interface)] of two hosts on one link."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (CI runs as root)")
    tag = secrets.token_hex(3)
    subnet = f"10.{int(tag[:2], 16)}.{int(tag[2:4], 16)}"
    hosts = [(f"scratchllm-{tag}-{side}", f"{subnet}.{i + 1}", f"v{tag}{side}") for i, side in enumerate("ab")]
    try:
        for namespace, _, _ in hosts:
            ip("netns", "add", namespace)
        ip("link", "add", hosts[0][2], "type", "veth", "peer", "name", hosts[1][2])
        for namespace, address, interface in hosts:
            ip("link", "set", interface, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", interface)
            ip("-n", namespace, "link", "set", interface, "up")
            ip("-n", namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        for namespace, _, _ in hosts:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)  # its end of the veth with it


def test_a_job_on_two_hosts_meets_at_part_0_and_takes_the_steps_of_one(service, two_hosts, shared_data):  # noqa: F811
    for namespace, address, interface in two_hosts:
        service.start_worker(("ip", "netns", "exec", namespace), SCRATCHLLM_NODE_ADDRESS=address,
                             SCRATCHLLM_DISTRIBUTED_INTERFACE=interface)
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    request = pretrain_request(verdict, max_steps=6, grad_accum_steps=2, checkpoint_interval=3, eval_interval=3)
    two = service.submit(**request, nodes=2)
    assert service.wait_until_done(two["id"])["status"] == "succeeded", events(service, two["id"])
    one = service.submit(**request)
    assert service.wait_until_done(one["id"])["status"] == "succeeded"
    assert np.allclose(losses(service, two["id"]), losses(service, one["id"]), rtol=1e-4)
    assert metric_rows(service.settings, two["id"], "train_loss") == 6  # rank 0 alone reports

    [meeting] = [e["data"] for e in events(service, two["id"]) if e["type"] == "devices"]
    [part] = [e["data"] for e in events(service, two["id"]) if e["type"] == "part"]
    addresses = {address for _, address, _ in two_hosts}
    assert meeting["nodes"] == 2 and meeting["rendezvous"].rsplit(":", 1)[0] in addresses
    statuses = [e["data"] for e in events(service, two["id"]) if e["type"] == "status"]
    runner = next(data["worker"] for data in statuses if data["status"] == "running")
    assert part["part"] == 1 and part["worker"] != runner  # the other host's worker took part 1
    assert rank_processes(two["id"]) == {}


def test_each_part_of_an_attempt_is_taken_once_after_part_0_says_where_to_meet(service, shared_data):  # noqa: F811
    from core import jobs
    from core.db import Database

    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**pretrain_request(verdict, grad_accum_steps=2), nodes=2)["id"]  # no worker runs it
    database = Database(service.settings.sqlalchemy_url)
    try:
        with database.session() as session:
            assert jobs.parts(session, job) == 2
            assert jobs.rendezvous_of(session, job) == ("queued", 0, None)  # a part waits
            assert jobs.claim(session, job, "host-a:1", 60, 3)
            assert not jobs.publish_rendezvous(session, job, "host-b:2", "10.0.0.2:29500")  # not its lease
            assert jobs.publish_rendezvous(session, job, "host-a:1", "10.0.0.1:29500")
        with database.session() as session:
            assert jobs.rendezvous_of(session, job) == ("running", 1, "10.0.0.1:29500")
            assert jobs.take_part(session, job, 1, 1, "host-b:3")
            assert not jobs.take_part(session, job, 1, 1, "host-c:4")  # the message delivered twice
            assert jobs.take_part(session, job, 1, 2, "host-c:4")
            assert jobs.hand_back(session, job, "host-a:1", "worker shutting down")
        with database.session() as session:  # the next attempt meets afresh
            assert jobs.claim(session, job, "host-a:5", 60, 3)
            assert jobs.rendezvous_of(session, job) == ("running", 2, None)
            assert jobs.take_part(session, job, 2, 1, "host-b:3")
    finally:
        database.dispose()


def test_part_0_without_its_address_fails_the_job_by_name(service, shared_data):  # noqa: F811
    service.start_worker()  # SCRATCHLLM_NODE_ADDRESS unset
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**pretrain_request(verdict, max_steps=2, grad_accum_steps=2), nodes=2)
    done = service.wait_for(job["id"], lambda j: j["status"] == "failed")
    assert "SCRATCHLLM_NODE_ADDRESS" in done["error"]


@pytest.mark.parametrize("service_env", [{"SCRATCHLLM_DISTRIBUTED_TIMEOUT_S": "60"}])
def test_a_rank_dying_on_the_other_host_ends_the_job(service, two_hosts, shared_data):  # noqa: F811
    for namespace, address, interface in two_hosts:
        service.start_worker(("ip", "netns", "exec", namespace), SCRATCHLLM_NODE_ADDRESS=address,
                             SCRATCHLLM_DISTRIBUTED_INTERFACE=interface)
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**pretrain_request(verdict, max_steps=100_000, grad_accum_steps=2, checkpoint_interval=0,
                                            eval_interval=0), nodes=2)
    service.wait_for(job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
    os.kill(rank_processes(job["id"])[1], signal.SIGKILL)  # part 1's rank, as the out-of-memory killer would
    asked = time.monotonic()
    done = service.wait_for(job["id"], lambda j: j["status"] not in ("queued", "running"), timeout_s=90)
    assert done["status"] == "failed" and "rank 0" in done["error"], done["error"]
    assert time.monotonic() - asked < 30, "rank 0 notices the lost peer, it does not wait out the timeout"
    assert rank_processes(job["id"]) == {}
