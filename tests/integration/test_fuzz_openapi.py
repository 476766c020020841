"""schemathesis over the whole OpenAPI document, as .ci/run runs it: every operation, called with an admin
key against a live `scratchllm api` on PostgreSQL and Redis that serves a default deployment, for
FUZZ_SECONDS. No answer may be a 5xx but the 503s the document declares (/health, and a deployment that is
not ready). tests/fuzz_hooks.py keeps the key valid and the default deployment served whatever the fuzzer
revokes or deletes."""

import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import torch

from core.migrate import upgrade
from model import GPT
from tests.helpers import TINY_LM, key_in, register_model
from tests.integration.test_faults import ApiProcess, settings_of, wait_until

FUZZ_SECONDS = 50
REPO = Path(__file__).resolve().parents[2]


def test_the_whole_api_fuzzed_answers_no_undeclared_server_error(postgres_url, tmp_path):
    env = {**os.environ, "SCRATCHLLM_DATA_DIR": str(tmp_path / "data"), "SCRATCHLLM_DATABASE_URL": postgres_url,
           "SCRATCHLLM_BROKER_URL": f"redis://127.0.0.1:6379/{1 + os.getpid() % 15}",
           "SCRATCHLLM_TRAINING_QUEUE": f"fuzz-{secrets.token_hex(4)}", "SCRATCHLLM_API_KEYS_REQUIRED": "true",
           "OMP_NUM_THREADS": "1"}
    settings = settings_of(env)
    settings.data_dir.mkdir(parents=True)
    upgrade(postgres_url)
    key = key_in(postgres_url, "admin", "fuzzing")
    torch.manual_seed(0)
    checkpoint_id = register_model(settings, GPT(TINY_LM))

    api = ApiProcess(env)
    api.start()
    try:
        admin = {"Authorization": f"Bearer {key}"}
        created = httpx.post(f"{api.url}/v1/deployments", headers=admin, json={
            "name": "default", "checkpoint_id": checkpoint_id, "default": True})
        assert created.status_code == 201, created.text
        wait_until(lambda: httpx.get(f"{api.url}/health").status_code == 200, 30, "the default deployment")

        fuzz_env = {**env, "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks", "PYTHONPATH": str(REPO),
                    "FUZZ_API_URL": api.url, "FUZZ_ADMIN_KEY": key, "FUZZ_CHECKPOINT_ID": checkpoint_id}
        schemathesis = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
        run = subprocess.run([schemathesis, "run", f"{api.url}/openapi.json", "--checks",
                              "only_declared_server_errors", "--max-time", str(FUZZ_SECONDS), "--workers", "1",
                              "--request-timeout", "30", "--no-color", "--suppress-health-check", "all"],
                             env=fuzz_env, cwd=REPO, capture_output=True, text=True, timeout=FUZZ_SECONDS + 240)
        report = run.stdout + run.stderr
        assert run.returncode == 0, report[-6000:]
        cases = sum(int(n) for n in re.findall(r"(\d+) generated", report))
        assert cases > 500, report[-3000:]  # the run tested, not just started
        assert httpx.get(f"{api.url}/livez").status_code == 200
    finally:
        api.kill()
