"""The job lifecycle under faults, with real processes on PostgreSQL and Redis: the API SIGKILLed while a
client streams a job's events, the broker restarted, the database restarted. Each ends with the job
succeeded, every metric step recorded once, checkpoint rows matching checkpoint directories, and the API
answering."""

import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from core.db import Database
from core.migrate import upgrade
from core.settings import Settings
from core.tables import Metric
from tests.helpers import free_port, key_in
from tests.integration.test_service_flow import (
    Service,
    checkpoint_paths,
    pretrain_request,
    service,  # noqa: F401 (the fixture, asked for by name below)
)

STEPS = 16


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def assert_recorded_once(settings: Settings, job_id: str, steps: int) -> None:
    """Every train_loss step exactly once, and each checkpoint row has its directory, each directory its row."""
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        recorded = list(session.scalars(select(Metric.step).where(Metric.job_id == job_id,
                                                                  Metric.name == "train_loss")))
    database.dispose()
    assert sorted(recorded) == list(range(1, steps + 1))
    storage = settings.storage
    directories = {storage.relative(d) for d in storage.job_checkpoints_dir(job_id).iterdir()
                   if not d.name.startswith(".")}
    assert checkpoint_paths(settings, job_id) == directories and directories


def settings_of(env: dict[str, str]) -> Settings:
    return Settings(**{k.removeprefix("SCRATCHLLM_").lower(): v for k, v in env.items()
                       if k.startswith("SCRATCHLLM_")})


# -- private servers, restarted by the tests ----------------------------------------------------------------

class PrivateRedis:
    def __init__(self):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed: the broker restart test needs a private Redis")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                         "--save", "", "--appendonly", "no", "--daemonize", "no"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 10, "the private redis-server")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # as a crash: its queues, kept only in memory, are gone
            self.process.wait()


class PrivatePostgres:
    def __init__(self):
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not binaries or shutil.which("runuser") is None:
            pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: the database restart "
                        "test needs a private cluster")
        self.bin = Path(binaries[-1]).parent
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="scratchllm-pg-"))
        os.chmod(self.dir, 0o755)
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")

    def _as_postgres(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run(prefix + list(command), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-w",
                          "-o", f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-m", mode, "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_redis():
    redis = PrivateRedis()
    redis.start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture
def private_postgres():
    postgres = PrivatePostgres()
    try:
        postgres.start()
        upgrade(postgres.url)
        yield postgres
    finally:
        postgres.remove()


@pytest.fixture
def service_env(request) -> dict[str, str]:
    """The service fixture's settings, on a private server where the test asks for one."""
    env = {"SCRATCHLLM_RESEND_QUEUED_AFTER_S": "2"}
    if "private_redis" in request.fixturenames:
        env["SCRATCHLLM_BROKER_URL"] = request.getfixturevalue("private_redis").url
    if "private_postgres" in request.fixturenames:
        env["SCRATCHLLM_DATABASE_URL"] = request.getfixturevalue("private_postgres").url
    return env


# -- the API SIGKILLed ---------------------------------------------------------------------------------------

class ApiProcess:
    def __init__(self, env: dict[str, str]):
        self.env, self.port = env, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "scratchllm", "api", "--port", str(self.port)],
                                        env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        wait_until(self.answers, 60, "the API to answer")

    def answers(self) -> bool:
        assert self.process.poll() is None, "the API exited"
        try:
            return httpx.get(f"{self.url}/livez", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture
def api_service(postgres_url, tmp_path):
    """A `scratchllm api` subprocess that requires keys, with a client holding a train key, and workers."""
    upgrade(postgres_url)
    env = {**os.environ, "SCRATCHLLM_DATA_DIR": str(tmp_path / "data"), "SCRATCHLLM_DATABASE_URL": postgres_url,
           "SCRATCHLLM_BROKER_URL": f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}",
           "SCRATCHLLM_TRAINING_QUEUE": f"test-{secrets.token_hex(4)}",
           "SCRATCHLLM_HEARTBEAT_INTERVAL_S": "0.5", "SCRATCHLLM_HEARTBEAT_TIMEOUT_S": "4",
           "SCRATCHLLM_RESEND_QUEUED_AFTER_S": "2", "SCRATCHLLM_WORKER_SOFT_SHUTDOWN_S": "2",
           "SCRATCHLLM_API_KEYS_REQUIRED": "true", "OMP_NUM_THREADS": "1"}
    settings = settings_of(env)
    settings.data_dir.mkdir(parents=True)
    key = key_in(postgres_url, "train", "fault tests")
    api = ApiProcess(env)
    api.start()
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        running = Service(settings, env, client)
        running.api = api
        try:
            yield running
        finally:
            running.stop()
            api.kill()


def test_the_api_sigkilled_while_a_client_streams_events_comes_back_and_the_job_finishes(api_service, shared_data):
    api_service.start_worker()
    verdict = api_service.upload(shared_data / "the-verdict.txt", "text")
    job = api_service.submit(**pretrain_request(verdict, max_steps=STEPS, checkpoint_interval=4, eval_interval=0))
    api_service.wait_for(job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)

    streamed: list[str] = []
    ended: list[BaseException | None] = []
    opened = threading.Event()

    def stream() -> None:
        try:
            with api_service.client.stream("GET", f"/v1/jobs/{job['id']}/events/stream", timeout=60) as response:
                assert response.status_code == 200
                opened.set()
                for line in response.iter_lines():
                    streamed.append(line)
            ended.append(None)
        except BaseException as e:  # the server is gone mid-stream: what a client sees
            ended.append(e)

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    assert opened.wait(10), "the event stream did not open"
    wait_until(lambda: streamed, 10, "the first streamed event")
    api_service.api.kill()
    reader.join(10)
    assert not reader.is_alive(), "the stream's client hangs after the server died"
    assert ended and ended[0] is not None and not any('"status": "succeeded"' in line for line in streamed)

    api_service.api.start()
    done = api_service.wait_until_done(job["id"])
    assert done["status"] == "succeeded" and done["progress"]["step"] == STEPS and done["attempts"] == 1
    assert_recorded_once(api_service.settings, job["id"], STEPS)
    steps = [p["step"] for p in api_service.client.get(f"/v1/jobs/{job['id']}/metrics",
                                                    params={"name": "train_loss"}).json()["data"]]
    assert steps == list(range(1, STEPS + 1))
    stream = api_service.client.get(f"/v1/jobs/{job['id']}/events/stream").text
    assert stream.rstrip().endswith('data: {"status": "succeeded"}')


# -- the broker restarted --------------------------------------------------------------------------------------

@pytest.mark.parametrize("service", ["postgresql+redis"], indirect=True)
def test_a_broker_restart_loses_a_queued_message_and_both_jobs_still_succeed(private_redis, service,  # noqa: F811
                                                                            shared_data, caplog):
    service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    running = service.submit(**pretrain_request(verdict, max_steps=STEPS, checkpoint_interval=4, eval_interval=0))
    service.wait_for(running["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
    waiting = service.submit(**pretrain_request(verdict, max_steps=4, checkpoint_interval=4, eval_interval=0))
    assert service.job(waiting["id"])["status"] == "queued"  # one job at a time: its message waits in Redis
    private_redis.stop()  # no persistence: the waiting job's message and the running one's unacked copy are lost
    time.sleep(1)
    private_redis.start()
    for job, steps in ((running, STEPS), (waiting, 4)):
        done = service.wait_until_done(job["id"])
        assert done["status"] == "succeeded" and done["progress"]["step"] == steps, done
        assert_recorded_once(service.settings, job["id"], steps)
    events = [e["message"] for e in service.client.get(f"/v1/jobs/{running['id']}/events").json()["data"]]
    assert not any("went silent" in m for m in events)  # the worker kept its lease through the outage
    resent = [r.getMessage() for r in caplog.records if r.name == "app.reaper"]
    assert any(m.startswith("sent again") and waiting["id"] in m for m in resent), resent
    assert service.client.get("/livez").status_code == 200


# -- the database restarted ------------------------------------------------------------------------------------

@pytest.mark.parametrize("service", ["postgresql+redis"], indirect=True)
def test_a_database_restart_while_a_job_runs_and_it_still_succeeds(private_postgres, service, shared_data):  # noqa: F811
    service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**pretrain_request(verdict, max_steps=STEPS, checkpoint_interval=4, eval_interval=0))
    service.wait_for(job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 2)
    private_postgres.stop()  # every connection closed: the worker's pooled ones are dead when it comes back
    time.sleep(1)
    private_postgres.start()
    done = service.wait_until_done(job["id"])
    # the worker's writes waited for the database: the same attempt ran on, nobody took the job from it
    assert done["status"] == "succeeded" and done["progress"]["step"] == STEPS and done["attempts"] == 1, done
    events = [e["message"] for e in service.client.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert not any("went silent" in m or m.startswith("resumed from") for m in events), events
    assert_recorded_once(service.settings, job["id"], STEPS)
    assert service.client.get("/livez").status_code == 200
