"""The command-line client against a live server (`scratchllm api` with keys required, and a worker): upload,
start from a YAML file and follow, list, deploy, generate, cancel; exit statuses; the live progress bar in a
pseudo-terminal."""

import json
import os
import pty
import re
import secrets
import select
import signal
import subprocess
import sys
import time

import pytest

from core.migrate import upgrade
from tests.helpers import key_in
from tests.integration.test_faults import ApiProcess, settings_of


@pytest.fixture
def server(tmp_path):
    """(environment for the client, the API's URL) of a live API and worker on SQLite and the filesystem broker."""
    env = {**os.environ, "SCRATCHLLM_DATA_DIR": str(tmp_path / "data"), "SCRATCHLLM_API_KEYS_REQUIRED": "true",
           "SCRATCHLLM_DATABASE_URL": f"sqlite:///{tmp_path / 'data' / 'scratchllm.db'}",
           "SCRATCHLLM_TRAINING_QUEUE": f"test-{secrets.token_hex(4)}", "OMP_NUM_THREADS": "1"}
    env.pop("SCRATCHLLM_BROKER_URL", None)
    settings = settings_of(env)
    settings.data_dir.mkdir(parents=True)
    upgrade(settings.sqlalchemy_url)
    key = key_in(settings.sqlalchemy_url, "deploy", "cli tests")
    api = ApiProcess(env)
    api.start()
    worker = subprocess.Popen([sys.executable, "-m", "scratchllm", "worker"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        yield {**env, "SCRATCHLLM_URL": api.url, "SCRATCHLLM_API_KEY": key, "COLUMNS": "160"}
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        api.kill()


def cli(env: dict, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchllm", *args], env=env, capture_output=True, text=True,
                          input=stdin, timeout=180)


def as_json(run: subprocess.CompletedProcess):
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_a_model_trained_deployed_and_generated_from_without_curl(server, shared_data, tmp_path):
    uploaded = cli(server, "corpora", "upload", str(shared_data / "the-verdict.txt"), "--kind", "text", "--json")
    corpus = as_json(uploaded)
    assert corpus["n_tokens"] == 5145
    spec = tmp_path / "job.yaml"
    spec.write_text(f"type: pretrain\ncorpus_id: {corpus['id']}\nmodel: {{preset: nano, context_length: 64}}\n"
                    "hyperparameters: {max_steps: 200, batch_size: 4, learning_rate: 0.003, eval_interval: 0}\n")
    started = cli(server, "jobs", "start", "--file", str(spec), "--steps", "12", "--follow")  # flags win
    assert started.returncode == 0, started.stderr
    assert re.search(r"job job_\w+ succeeded at step 12, train loss [\d.]+, val loss [\d.]+", started.stdout)
    jobs = as_json(cli(server, "jobs", "list", "--json"))
    assert [(j["status"], j["progress"]["step"]) for j in jobs] == [("succeeded", 12)]
    checkpoint = as_json(cli(server, "checkpoints", "list", "--json"))[0]
    assert checkpoint["job_id"] == jobs[0]["id"] and checkpoint["step"] == 12
    assert f"its last checkpoint: {checkpoint['id']} (step 12)" in started.stdout  # what to use next
    evaluated = cli(server, "evaluate", checkpoint["id"], "--corpus", corpus["id"], "--follow")
    assert evaluated.returncode == 0 and re.search(r"loss [\d.]+ +perplexity", evaluated.stdout), evaluated
    compared = cli(server, "compare", "--corpus", corpus["id"])
    assert compared.returncode == 0 and checkpoint["id"][:12] in compared.stdout and " *" in compared.stdout
    deployed = cli(server, "deploy", "verdict", checkpoint["id"])
    assert deployed.returncode == 0 and "ready" in deployed.stdout and "cpu float32" in deployed.stdout
    generated = cli(server, "generate", "I had always", "--max-tokens", "8")
    assert generated.returncode == 0 and generated.stdout.strip(), generated
    table = cli(server, "jobs", "list")
    assert jobs[0]["id"][:12] in table.stdout and "succeeded" in table.stdout


def test_exit_statuses_tell_success_from_failure(server, shared_data, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\x00\x01binary")
    refused = cli(server, "corpora", "upload", str(bad), "--kind", "text")
    assert refused.returncode == 1 and "HTTP 422" in refused.stderr and "binary" in refused.stderr
    wrong_key = cli({**server, "SCRATCHLLM_API_KEY": "sk-nope"}, "jobs", "list")
    assert wrong_key.returncode == 1 and "HTTP 401" in wrong_key.stderr
    unreachable = cli({**server, "SCRATCHLLM_URL": "http://127.0.0.1:9"}, "jobs", "list")
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr

    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short to hold one window\n")
    corpus = as_json(cli(server, "corpora", "upload", str(tiny), "--kind", "text", "--json"))["id"]
    failed = cli(server, "jobs", "start", "--corpus", corpus, "--preset", "nano", "--steps", "5", "--follow")
    assert failed.returncode == 1 and "failed" in failed.stderr, failed

    verdict = as_json(cli(server, "corpora", "upload", str(shared_data / "the-verdict.txt"), "--kind", "text",
                          "--json"))["id"]
    long = as_json(cli(server, "jobs", "start", "--corpus", verdict, "--preset", "nano", "--steps", "100000",
                       "--json"))
    cancelled = cli(server, "jobs", "cancel", long["id"])
    assert cancelled.returncode == 0 and "cancel" in cancelled.stdout
    followed = cli(server, "jobs", "follow", long["id"])
    assert followed.returncode == 3 and "cancelled" in followed.stderr


def test_the_progress_bar_updates_in_a_terminal(server, shared_data):
    corpus = as_json(cli(server, "corpora", "upload", str(shared_data / "the-verdict.txt"), "--kind", "text",
                         "--json"))["id"]
    job = as_json(cli(server, "jobs", "start", "--corpus", corpus, "--preset", "nano", "--steps", "30",
                      "--batch-size", "4", "--json"))
    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "scratchllm", "jobs", "follow", job["id"]], env=server,
                               stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    screen, deadline = b"", time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1)
        if ready:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the client exited and closed the terminal
                break
            if not chunk:
                break
            screen += chunk
    os.close(leader)
    assert process.wait(30) == 0
    steps = [int(n) for n in re.findall(rb"step (\d+)/30", screen)]
    assert len(set(steps)) >= 3 and steps == sorted(steps) and steps[-1] == 30, steps  # redrawn as it trains
    assert b"\x1b[" in screen  # drawn in place with terminal control codes


def test_deploy_serves_adapters_that_generate_picks_by_name(server):
    import httpx
    import torch

    from model import GPT, generate, gpt2_tokenizer
    from tests.helpers import TINY_LM, add_adapter, register_model

    settings = settings_of(server)
    torch.manual_seed(0)
    base_model = GPT(TINY_LM).eval()
    base = register_model(settings, base_model)
    adapter, merged = add_adapter(settings, base, base_model, seed=1, rank=2)
    deployed = cli(server, "deploy", "tiny", base, "--adapter", f"poet={adapter}", "--json")
    assert deployed.returncode == 0, deployed.stderr
    assert as_json(deployed)["serving_adapters"] == {"poet": adapter}
    tokenizer = gpt2_tokenizer()
    prompt = tokenizer.encode("I had always")
    expected = generate(merged, torch.tensor([prompt]), 6)[0, len(prompt):].tolist()
    answer = httpx.post(server["SCRATCHLLM_URL"] + "/d/tiny:poet/generate", headers={
        "Authorization": f"Bearer {server['SCRATCHLLM_API_KEY']}"}, json={"inputs": "I had always", "parameters": {
            "max_new_tokens": 6, "details": True}}).json()
    assert [token["id"] for token in answer["details"]["tokens"]] == expected  # the adapter's own answer
    generated = cli(server, "generate", "I had always", "--deployment", "tiny:poet", "--max-tokens", "6")
    assert generated.returncode == 0 and generated.stdout == answer["generated_text"] + "\n", generated
    refused = cli(server, "deploy", "tiny", base, "--adapter", "poet")
    assert refused.returncode != 0 and "NAME=CHECKPOINT" in refused.stderr
