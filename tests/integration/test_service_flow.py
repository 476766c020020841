"""The whole training flow against real components: a Celery worker subprocess with PostgreSQL + Redis,
and again in embedded mode with SQLite + the filesystem broker."""

import json
import os
import secrets
import signal
import subprocess
import sys
import time

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from sqlalchemy import func, select

from app.main import create_app
from core.db import Database
from core.migrate import upgrade
from core.settings import Settings
from core.tables import Checkpoint, Metric
from model import GPT, generate, gpt2_tokenizer, has_training_state, load_checkpoint, merge_lora
from tests.helpers import TINY_LM, local_client, register_model

JOB_TIMEOUT_S = 180


class Service:
    def __init__(self, settings: Settings, env: dict[str, str], client: TestClient):
        self.settings, self.env, self.client = settings, env, client
        self.workers: list[subprocess.Popen] = []

    def start_worker(self, prefix: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
        """A worker with the service's settings and env's on top; prefix: a command it runs under (ip netns exec)."""
        worker = subprocess.Popen([*prefix, sys.executable, "-m", "scratchllm", "worker"], env={**self.env, **env},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.workers.append(worker)
        return worker

    def kill_worker(self, worker: subprocess.Popen) -> None:
        os.killpg(worker.pid, signal.SIGKILL)  # the pool child too: nothing gets to clean up
        worker.wait()

    def stop(self) -> None:
        # the test is over: a soft shutdown would only cost time (seconds on the filesystem broker)
        for worker in self.workers:
            if worker.poll() is None:
                self.kill_worker(worker)

    def upload(self, path, kind: str, content: bytes | None = None, filename: str | None = None) -> str:
        response = self.client.post("/v1/corpora", data={"kind": kind},
                                    files={"file": (filename or path.name, content or path.read_bytes())})
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def submit(self, **request) -> dict:
        response = self.client.post("/v1/jobs", json=request)
        assert response.status_code == 201, response.text
        return response.json()

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/v1/jobs/{job_id}").json()

    def wait_for(self, job_id: str, condition, timeout_s: float = JOB_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if condition(job):
                return job
            if job["status"] == "failed":
                raise AssertionError(f"job failed: {job['error']}")
            time.sleep(0.3)
        raise AssertionError(f"timed out; job is {self.job(job_id)}")

    def wait_until_done(self, job_id: str) -> dict:
        return self.wait_for(job_id, lambda j: j["status"] in ("succeeded", "cancelled"))


@pytest.fixture
def service_env() -> dict[str, str]:
    """Settings beyond the service fixture's own: a test parametrizes this to change them."""
    return {}


@pytest.fixture(params=["postgresql+redis", "embedded"])
def service(request, tmp_path, service_env):
    if request.param == "embedded":
        database_url, broker_url = f"sqlite:///{tmp_path / 'data' / 'scratchllm.db'}", None
    else:
        database_url, broker_url = request.getfixturevalue("postgres_url"), "redis://127.0.0.1:6379/0"
    env = {**os.environ, "SCRATCHLLM_DATA_DIR": str(tmp_path / "data"), "SCRATCHLLM_DATABASE_URL": database_url,
           "SCRATCHLLM_TRAINING_QUEUE": f"test-{secrets.token_hex(4)}",  # tests never share a queue
           "SCRATCHLLM_HEARTBEAT_INTERVAL_S": "0.5", "SCRATCHLLM_HEARTBEAT_TIMEOUT_S": "4",
           "SCRATCHLLM_WORKER_SOFT_SHUTDOWN_S": "2", "SCRATCHLLM_API_KEYS_REQUIRED": "false",
           "OMP_NUM_THREADS": "1"}  # tiny models gain nothing from threads, and tests run side by side
    if broker_url:
        env["SCRATCHLLM_BROKER_URL"] = broker_url
    else:
        env.pop("SCRATCHLLM_BROKER_URL", None)
    env |= service_env
    settings = Settings(**{k.removeprefix("SCRATCHLLM_").lower(): v for k, v in env.items()
                           if k.startswith("SCRATCHLLM_")})
    settings.data_dir.mkdir(parents=True)
    upgrade(database_url)
    with local_client(create_app(settings)) as client:
        running = Service(settings, env, client)
        try:
            yield running
        finally:
            running.stop()


def pretrain_request(corpus_id: str, **hyperparameters) -> dict:
    return {"type": "pretrain", "corpus_id": corpus_id, "model": {"preset": "nano", "context_length": 64},
            "tokenizer": "gpt2", "seed": 1,
            "hyperparameters": {"max_steps": 20, "batch_size": 4, "learning_rate": 0.003, "eval_interval": 10,
                                "eval_batches": 2, "checkpoint_interval": 10, **hyperparameters}}


def metric_rows(settings: Settings, job_id: str, name: str) -> int:
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        count = session.scalar(select(func.count()).where(Metric.job_id == job_id, Metric.name == name))
    database.dispose()
    return count


@pytest.mark.parametrize("preset", ["nano", "qwen3-nano"])  # GPT-2, and the Llama family with every option
def test_pretrain_then_finetune_a_classifier_and_an_instruction_model(service, shared_data, preset):
    service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**{**pretrain_request(verdict), "model": {"preset": preset, "context_length": 64}})
    assert job["status"] == "queued" and job["progress"]["total_steps"] == 20
    done = service.wait_until_done(job["id"])
    assert done["status"] == "succeeded", done
    assert done["progress"]["step"] == 20 and done["progress"]["tokens_seen"] == 20 * 4 * 64
    assert done["progress"]["val_loss"] is not None and done["started_at"] and done["finished_at"]
    train_loss = service.client.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "train_loss"}).json()["data"]
    assert [p["step"] for p in train_loss] == list(range(1, 21))
    assert train_loss[-1]["value"] < train_loss[0]["value"]
    val_loss = service.client.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "val_loss"}).json()["data"]
    assert [p["step"] for p in val_loss] == [10, 20]
    checkpoints = service.client.get("/v1/checkpoints", params={"job_id": job["id"]}).json()["data"]
    assert [c["step"] for c in checkpoints] == [20, 10] and all(c["task"] == "lm" for c in checkpoints)
    events = service.client.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [e["type"] for e in events if e["type"] == "status"] == ["status"] * 3  # queued, running, succeeded
    stream = service.client.get(f"/v1/jobs/{job['id']}/events/stream").text
    assert stream.rstrip().endswith('data: {"status": "succeeded"}') and "checkpoint at step 10" in stream

    # continued pretraining starts from the checkpoint's weights: its first loss is the pretrained model's, not a
    # new model's
    continued = service.submit(type="pretrain", corpus_id=verdict, base_checkpoint_id=checkpoints[0]["id"],
                               hyperparameters={"max_steps": 4, "batch_size": 4, "checkpoint_interval": 0})
    assert continued["spec"]["model_config"] == checkpoints[0]["architecture"]
    assert service.wait_until_done(continued["id"])["status"] == "succeeded"
    continued_loss = service.client.get(f"/v1/jobs/{continued['id']}/metrics",
                                        params={"name": "train_loss"}).json()["data"]
    assert continued_loss[0]["value"] < (train_loss[0]["value"] + train_loss[-1]["value"]) / 2
    [onward] = service.client.get("/v1/checkpoints", params={"job_id": continued["id"]}).json()["data"]
    assert onward["parent_id"] == checkpoints[0]["id"] and onward["tokenizer_type"] == checkpoints[0]["tokenizer_type"]

    sms = b"\n".join((shared_data / "SMSSpamCollection.tsv").read_bytes().split(b"\n")[:120])
    spam = service.upload(None, "classification", sms, "sms.tsv")
    classifier = service.submit(type="finetune_classifier", corpus_id=spam, base_checkpoint_id=checkpoints[0]["id"],
                                hyperparameters={"max_steps": 8, "batch_size": 8, "eval_interval": 4,
                                                 "checkpoint_interval": 0, "max_length": 64})
    done = service.wait_until_done(classifier["id"])
    assert done["status"] == "succeeded", done
    [checkpoint] = service.client.get("/v1/checkpoints", params={"job_id": classifier["id"]}).json()["data"]
    assert checkpoint["task"] == "classifier" and checkpoint["label_names"] == ["ham", "spam"]
    assert checkpoint["parent_id"] == checkpoints[0]["id"] and "val_accuracy" in checkpoint["metrics"]

    records = json.loads((shared_data / "instruction-data.json").read_text())[:30]
    instructions = service.upload(None, "instruction", json.dumps(records).encode(), "alpaca.json")
    instruct = service.submit(type="finetune_instruct", corpus_id=instructions,
                              base_checkpoint_id=checkpoints[0]["id"], lora={"rank": 4, "alpha": 8},
                              hyperparameters={"max_steps": 6, "batch_size": 4, "eval_interval": 3,
                                               "checkpoint_interval": 0})
    done = service.wait_until_done(instruct["id"])
    assert done["status"] == "succeeded", done
    [checkpoint] = service.client.get("/v1/checkpoints", params={"job_id": instruct["id"]}).json()["data"]
    assert checkpoint["task"] == "lm" and checkpoint["prompt_format"] == "alpaca"

    pairs = service.upload(None, "preference", json.dumps(preference_records(records[:16])).encode(), "pairs.json")
    dpo = service.submit(type="finetune_dpo", corpus_id=pairs, base_checkpoint_id=checkpoint["id"],
                         hyperparameters={"max_steps": 2, "batch_size": 4, "checkpoint_interval": 0,
                                          "learning_rate": 1e-4, "max_length": 48})
    assert service.wait_until_done(dpo["id"])["status"] == "succeeded"
    evaluation = service.client.post("/v1/evaluations", json={"checkpoint_id": checkpoints[0]["id"],
                                                               "corpus_id": verdict, "max_tokens": 2000}).json()
    assert service.wait_until_done(evaluation["job_id"])["status"] == "succeeded"
    metrics = service.client.get(f"/v1/evaluations/{evaluation['id']}").json()["metrics"]
    assert 0 < metrics["bits_per_byte"] < metrics["uniform_bits_per_byte"]


def test_evaluate_a_training_jobs_checkpoints_on_its_validation_corpus(service, shared_data):
    service.start_worker()
    text = (shared_data / "the-verdict.txt").read_text()
    train = service.upload(None, "text", text[:18000].encode(), "train.txt")
    validation = service.upload(None, "text", text[18000:].encode(), "validation.txt")
    job = service.submit(**pretrain_request(train), validation_corpus_id=validation)
    assert service.wait_until_done(job["id"])["status"] == "succeeded"
    checkpoints = service.client.get("/v1/checkpoints", params={"job_id": job["id"]}).json()["data"]
    evaluations = []
    for checkpoint in checkpoints:
        response = service.client.post("/v1/evaluations", json={"checkpoint_id": checkpoint["id"],
                                                                "corpus_id": validation, "block_size": 64})
        assert response.status_code == 201, response.text
        evaluations.append(response.json())
    for evaluation in evaluations:
        assert service.wait_until_done(evaluation["job_id"])["status"] == "succeeded"

    link = service.job(job["id"])["links"]["evaluations"]
    assert link == f"/v1/evaluations?training_job_id={job['id']}&corpus_id={validation}"
    linked = service.client.get(link).json()["data"]
    assert sorted(e["id"] for e in linked) == sorted(e["id"] for e in evaluations)
    assert all(e["status"] == "succeeded" and e["metrics"]["bytes"] == len(text[18000:].encode()) for e in linked)
    table = service.client.get("/v1/evaluations/compare", params={"corpus_id": validation}).json()
    assert table["comparable"] and {row["checkpoint_step"] for row in table["rows"]} == {10, 20}
    assert all(row["training_job_id"] == job["id"] for row in table["rows"])
    by_step = {row["checkpoint_step"]: row["metrics"]["loss"] for row in table["rows"]}
    assert table["best"]["loss"] == next(row["evaluation_id"] for row in table["rows"]
                                         if row["metrics"]["loss"] == min(by_step.values()))

    records = json.loads((shared_data / "instruction-data.json").read_text())[:12]
    instructions = service.upload(None, "instruction", json.dumps(records[:8]).encode(), "train.json")
    held_out = service.upload(None, "instruction", json.dumps(records[8:]).encode(), "held-out.json")
    instruct = service.submit(type="finetune_instruct", corpus_id=instructions, base_checkpoint_id=checkpoints[0]["id"],
                              lora={"rank": 4, "alpha": 8},
                              hyperparameters={"max_steps": 2, "batch_size": 4, "checkpoint_interval": 0})
    assert service.wait_until_done(instruct["id"])["status"] == "succeeded"
    [tuned] = service.client.get("/v1/checkpoints", params={"job_id": instruct["id"]}).json()["data"]
    response = service.client.post("/v1/evaluations", json={"checkpoint_id": tuned["id"], "corpus_id": held_out,
                                                            "max_new_tokens": 4})
    assert response.status_code == 201, response.text
    assert service.wait_until_done(response.json()["job_id"])["status"] == "succeeded"
    evaluation = service.client.get(f"/v1/evaluations/{response.json()['id']}").json()
    assert evaluation["kind"] == "instruct" and evaluation["metrics"]["examples"] == 4
    assert evaluation["progress"] == {"step": 8, "total_steps": 8}  # 4 records scored, 4 answered


def test_adapter_only_finetunes_are_served_per_request_over_their_base(service, shared_data):
    service.start_worker()
    torch.manual_seed(0)
    base_model = GPT(TINY_LM).eval()
    base = register_model(service.settings, base_model)
    records = json.loads((shared_data / "instruction-data.json").read_text())[:16]
    instructions = service.upload(None, "instruction", json.dumps(records[:12]).encode(), "train.json")
    held_out = service.upload(None, "instruction", json.dumps(records[12:]).encode(), "held-out.json")
    finetune = {"type": "finetune_instruct", "corpus_id": instructions, "base_checkpoint_id": base,
                "hyperparameters": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.02, "checkpoint_interval": 2}}
    jobs = [service.submit(**finetune, lora={"rank": rank, "alpha": 2 * rank}, adapter_only=True, seed=rank)
            for rank in (2, 4)]
    adapters = []
    for job in jobs:
        assert service.wait_until_done(job["id"])["status"] == "succeeded"
        checkpoints = service.client.get("/v1/checkpoints", params={"job_id": job["id"]}).json()["data"]
        assert [c["step"] for c in checkpoints] == [4, 2]
        assert all(c["adapter_of_id"] == base and c["prompt_format"] == "alpaca" for c in checkpoints)
        adapters.append(checkpoints[0]["id"])
    directories = checkpoint_dirs(service.settings, [base, *adapters])
    with safe_open(directories[adapters[0]] / "model.safetensors", framework="pt") as weights:
        keys = list(weights.keys())
    assert keys and all(key.endswith(("lora_a", "lora_b")) for key in keys)

    # the worker loads an adapter over its base to evaluate it, and to finetune from it
    response = service.client.post("/v1/evaluations", json={"checkpoint_id": adapters[0], "corpus_id": held_out,
                                                            "max_new_tokens": 4})
    assert response.status_code == 201, response.text
    assert service.wait_until_done(response.json()["job_id"])["status"] == "succeeded"
    # in epochs: 11 training records (one held out) in batches of 4 make 2 batches an epoch, so 2 epochs are 4 steps
    onward = service.submit(**{**finetune, "base_checkpoint_id": adapters[1],
                               "hyperparameters": {"epochs": 2, "batch_size": 4, "checkpoint_interval": 0}})
    assert onward["progress"]["total_steps"] == 6  # the service's estimate from the corpus: 10.8 records
    done = service.wait_until_done(onward["id"])
    assert done["status"] == "succeeded" and done["progress"]["step"] == done["progress"]["total_steps"] == 4

    deployed = service.client.post("/v1/deployments", json={"name": "adapted", "checkpoint_id": base,
                                                            "adapters": {"one": adapters[0], "two": adapters[1]}})
    assert deployed.status_code == 201, deployed.text
    deadline = time.monotonic() + 30
    while service.client.get("/v1/deployments/adapted").json()["state"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    tokenizer = gpt2_tokenizer()
    prompt = tokenizer.encode("Below is an instruction")
    for name, adapter in (("one", adapters[0]), ("two", adapters[1])):
        model = merge_lora(load_checkpoint(directories[adapter], base=directories[base])[0])
        expected = tokenizer.decode(generate(model, torch.tensor([prompt]), 8)[0, len(prompt):].tolist())
        answer = service.client.post("/v1/completions", json={"model": f"adapted:{name}", "prompt": prompt,
                                                               "max_tokens": 8, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == expected


def test_a_job_keeps_its_newest_checkpoints_and_its_best_and_frees_the_rest(service, shared_data):
    service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    # a learning rate high enough to overshoot, so the best validation loss may come before the newest two
    job = service.submit(**pretrain_request(verdict, max_steps=8, checkpoint_interval=1, eval_interval=1,
                                            learning_rate=0.05), keep_checkpoints=2)
    assert service.wait_until_done(job["id"])["status"] == "succeeded"
    kept = service.client.get("/v1/checkpoints", params={"job_id": job["id"]}).json()["data"]
    val_loss = {p["step"]: p["value"] for p in service.client.get(
        f"/v1/jobs/{job['id']}/metrics", params={"name": "val_loss"}).json()["data"]}
    best = min(val_loss, key=val_loss.get)
    assert sorted(c["step"] for c in kept) == sorted({8, 7, best})
    directories = checkpoint_dirs(service.settings, [c["id"] for c in kept])
    on_disk = {path.name for path in directories[kept[0]["id"]].parent.iterdir() if not path.name.startswith(".")}
    assert on_disk == {path.name for path in directories.values()}  # the others' files are gone
    for checkpoint in kept:
        directory = directories[checkpoint["id"]]
        assert has_training_state(directory) == (checkpoint["step"] == 8)  # only the newest resumes
        assert checkpoint["size_bytes"] == sum(f.stat().st_size for f in directory.iterdir())
        load_checkpoint(directory)  # every kept one still loads


def test_a_llama_model_trains_with_muon_and_serves(service, shared_data):
    service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    request = pretrain_request(verdict, max_steps=12, eval_interval=6, checkpoint_interval=0, optimizer="muon",
                               schedule="wsd", learning_rate=0.003)
    job = service.submit(**{**request, "model": {"preset": "llama-nano", "context_length": 64}})
    config = job["spec"]["model_config"]
    assert (config["position"], config["norm"], config["mlp"], config["n_kv_head"]) == ("rope", "rmsnorm", "swiglu", 2)
    assert service.wait_until_done(job["id"])["status"] == "succeeded"
    losses = [p["value"] for p in service.client.get(f"/v1/jobs/{job['id']}/metrics",
                                                      params={"name": "train_loss"}).json()["data"]]
    assert len(losses) == 12 and losses[-1] < losses[0] - 1
    rates = [p["value"] for p in service.client.get(f"/v1/jobs/{job['id']}/metrics",
                                                     params={"name": "learning_rate"}).json()["data"]]
    assert rates[0] == rates[8] == 0.003 and rates[-1] < 0.003  # warmup-stable-decay: flat, then decaying
    [checkpoint] = service.client.get("/v1/checkpoints", params={"job_id": job["id"]}).json()["data"]
    deployed = service.client.post("/v1/deployments", json={"name": "llama", "checkpoint_id": checkpoint["id"]})
    assert deployed.status_code == 201, deployed.text
    deadline = time.monotonic() + 30
    while service.client.get("/v1/deployments/llama").json()["state"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    answer = service.client.post("/v1/completions", json={"model": "llama", "prompt": "I had always",
                                                           "max_tokens": 5, "temperature": 0, "logprobs": 1})
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"][0]["logprobs"]["tokens"]) == 5


def preference_records(records: list[dict]) -> list[dict]:
    """The book's DPO format from instruction records: chosen, the reference answer; rejected, the next record's."""
    return [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
             "rejected": records[(i + 1) % len(records)]["output"]} for i, r in enumerate(records)]


def test_dpo_tunes_an_instruction_model_on_preference_pairs(service, shared_data):
    service.start_worker()
    torch.manual_seed(0)
    base = register_model(service.settings, GPT(TINY_LM).eval(), prompt_format="alpaca")
    not_instructed = register_model(service.settings, GPT(TINY_LM).eval())
    records = preference_records(json.loads((shared_data / "instruction-data.json").read_text())[:24])
    pairs = service.upload(None, "preference", "\n".join(json.dumps(r) for r in records[:16]).encode(), "p.jsonl")
    held_out = service.upload(None, "preference", json.dumps(records[16:]).encode(), "held-out.json")
    assert service.client.get(f"/v1/corpora/{pairs}").json()["n_records"] == 16
    dpo = {"type": "finetune_dpo", "corpus_id": pairs, "base_checkpoint_id": base, "lora": {"rank": 4},
           "dpo_beta": 0.5, "hyperparameters": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.01,
                                                "eval_interval": 2, "max_length": 48}}
    refused = service.client.post("/v1/jobs", json={**dpo, "base_checkpoint_id": not_instructed})
    assert refused.status_code == 422 and "instruction" in refused.json()["error"]["message"]
    job = service.submit(**dpo)
    assert service.wait_until_done(job["id"])["status"] == "succeeded"
    accuracy = service.client.get(f"/v1/jobs/{job['id']}/metrics",
                                  params={"name": "val_preference_accuracy"}).json()["data"]
    assert [p["step"] for p in accuracy] == [2, 4] and all(0 <= p["value"] <= 1 for p in accuracy)
    [tuned] = service.client.get("/v1/checkpoints", params={"job_id": job["id"]}).json()["data"]
    assert tuned["prompt_format"] == "alpaca" and tuned["parent_id"] == base
    for checkpoint in (base, tuned["id"]):
        response = service.client.post("/v1/evaluations", json={"checkpoint_id": checkpoint, "corpus_id": held_out})
        assert response.status_code == 201, response.text
        assert service.wait_until_done(response.json()["job_id"])["status"] == "succeeded"
        evaluation = service.client.get(f"/v1/evaluations/{response.json()['id']}").json()
        assert evaluation["kind"] == "preference" and evaluation["metrics"]["examples"] == 8
        assert 0 <= evaluation["metrics"]["preference_accuracy"] <= 1
        worst = evaluation["details"]["worst_examples"]
        assert worst[0]["score"] == min(w["score"] for w in worst) and worst[0]["chosen"] and worst[0]["rejected"]


def checkpoint_dirs(settings: Settings, checkpoint_ids: list[str]) -> dict:
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        paths = {i: settings.storage.checkpoint_dir(session.get(Checkpoint, i).path) for i in checkpoint_ids}
    database.dispose()
    return paths


def test_cancel_a_running_job_keeps_a_final_checkpoint(service, shared_data):
    service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**pretrain_request(verdict, max_steps=100_000, checkpoint_interval=0))
    service.wait_for(job["id"], lambda j: j["status"] == "running" and j["progress"]["step"] >= 3)
    asked = time.monotonic()
    assert service.client.post(f"/v1/jobs/{job['id']}/cancel").json()["cancel_requested"] is True
    done = service.wait_for(job["id"], lambda j: j["status"] == "cancelled", timeout_s=30)
    assert time.monotonic() - asked < 10
    [checkpoint] = service.client.get("/v1/checkpoints", params={"job_id": job["id"]}).json()["data"]
    assert checkpoint["step"] == done["progress"]["step"]
    response = service.client.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 409 and "already ended cancelled" in response.json()["error"]["message"]


def test_a_queued_job_cancelled_never_starts(service, shared_data):
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**pretrain_request(verdict))
    assert service.client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
    later = service.submit(**pretrain_request(verdict, max_steps=2))
    service.start_worker()
    # one worker takes the messages in order: once it ran the later job, it has received the first and dropped it
    assert service.wait_until_done(later["id"])["status"] == "succeeded"
    after = service.job(job["id"])
    assert after["status"] == "cancelled" and after["attempts"] == 0 and after["started_at"] is None


def test_a_killed_worker_job_resumes_on_another_without_duplicate_metrics(service, shared_data):
    first = service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**pretrain_request(verdict, max_steps=24, checkpoint_interval=5, eval_interval=0))
    service.wait_for(job["id"], lambda j: j["progress"]["step"] >= 12)
    service.kill_worker(first)
    service.start_worker()
    done = service.wait_until_done(job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2
    events = [e["message"] for e in service.client.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert any("went silent" in m for m in events) and any(m.startswith("resumed from") for m in events)
    assert metric_rows(service.settings, job["id"], "train_loss") == 24
    steps = [p["step"] for p in service.client.get(f"/v1/jobs/{job['id']}/metrics",
                                                    params={"name": "train_loss"}).json()["data"]]
    assert steps == list(range(1, 25))


def checkpoint_paths(settings: Settings, job_id: str) -> set[str]:
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        paths = set(session.scalars(select(Checkpoint.path).where(Checkpoint.job_id == job_id)))
    database.dispose()
    return paths


# killed once is run in both setups above; these two, each in one, keep the layer within its time
@pytest.mark.parametrize("service", ["postgresql+redis"], indirect=True)
def test_a_job_resumes_after_its_worker_is_killed_twice_and_records_everything_once(service, shared_data):
    worker = service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    # every checkpoint kept (keep_checkpoints 0), to see each recorded once
    job = service.submit(**pretrain_request(verdict, max_steps=24, checkpoint_interval=5, eval_interval=0),
                         keep_checkpoints=0)

    def kill_on(worker: subprocess.Popen, attempt: int, step: int) -> subprocess.Popen:
        service.wait_for(job["id"], lambda j: j["attempts"] == attempt and j["progress"]["step"] >= step)
        service.kill_worker(worker)
        return service.start_worker()

    worker = kill_on(worker, 1, 7)
    kill_on(worker, 2, 12)  # past the checkpoint at step 10, after resuming from step 5
    done = service.wait_until_done(job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    assert metric_rows(service.settings, job["id"], "train_loss") == 24
    # each checkpoint row has its directory, each directory its row (a SIGKILL may leave a hidden staging folder)
    storage = service.settings.storage
    directories = {storage.relative(d) for d in storage.job_checkpoints_dir(job["id"]).iterdir()
                   if not d.name.startswith(".")}
    assert checkpoint_paths(service.settings, job["id"]) == directories
    assert sorted(int(d.rsplit("-", 1)[1]) for d in directories) == [5, 10, 15, 20, 24]


@pytest.mark.parametrize("service", ["embedded"], indirect=True)
@pytest.mark.parametrize("service_env", [{"SCRATCHLLM_MAX_ATTEMPTS": "2"}], ids=["max_attempts=2"])
def test_a_job_whose_worker_dies_on_every_attempt_fails_at_the_attempt_cap(service, shared_data):
    first = service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**pretrain_request(verdict, max_steps=100_000, checkpoint_interval=0, eval_interval=0))
    service.wait_for(job["id"], lambda j: j["status"] == "running")
    service.kill_worker(first)  # as the kernel's OOM killer would
    second = service.start_worker()
    service.wait_for(job["id"], lambda j: j["status"] == "running" and j["attempts"] == 2)
    service.kill_worker(second)
    failed = service.wait_for(job["id"], lambda j: j["status"] == "failed", timeout_s=30)
    assert failed["attempts"] == 2 and "attempt cap (2 starts)" in failed["error"]


def test_a_stopped_worker_hands_its_job_back_and_another_finishes_it(service, shared_data):
    first = service.start_worker()
    verdict = service.upload(shared_data / "the-verdict.txt", "text")
    job = service.submit(**pretrain_request(verdict, max_steps=20, checkpoint_interval=0, eval_interval=0))
    service.wait_for(job["id"], lambda j: j["progress"]["step"] >= 5)
    os.kill(first.pid, signal.SIGTERM)  # as docker stop or Ctrl-C does: a soft shutdown
    first.wait(timeout=30)
    handed_back = service.job(job["id"])
    assert handed_back["status"] == "queued", handed_back
    service.start_worker()
    done = service.wait_until_done(job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2
    events = [e["message"] for e in service.client.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
    assert any(m.startswith("worker shutting down") for m in events)
    assert any(m.startswith("resumed from") for m in events)
    assert metric_rows(service.settings, job["id"], "train_loss") == 20
