"""schemathesis hooks for tests/integration/test_fuzz_openapi.py (loaded by SCHEMATHESIS_HOOKS).

The fuzzer calls everything with an admin key, so it revokes keys and deletes or repoints deployments and
checkpoints. These hooks keep the run meaningful: a revoked key is replaced by a new admin key (made as
`scratchllm keys create` makes it), and whenever the default deployment is gone, it is served again (its
checkpoint registered again if that was deleted too). The check accepts a 5xx only where the operation's
OpenAPI document declares it.
"""

import os

import httpx
import schemathesis
import torch

from core.settings import settings_from_environment
from model import GPT
from tests.helpers import TINY_LM, key_in, register_model

DEPLOYMENT = "default"


class Target:
    """The server under test, from the environment the test gives the schemathesis process."""

    def __init__(self):
        self.url = os.environ["FUZZ_API_URL"]
        self.key = os.environ["FUZZ_ADMIN_KEY"]
        self.checkpoint_id = os.environ["FUZZ_CHECKPOINT_ID"]
        self.settings = settings_from_environment()
        self.keys_minted = self.deployments_restored = 0

    def call(self, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}"}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)

    def renew_key_if_revoked(self) -> None:
        if self.call("GET", "/v1/api-keys", params={"limit": 1}).status_code != 401:
            return
        self.key = key_in(self.settings.sqlalchemy_url, "admin", "fuzzing (renewed)")
        self.keys_minted += 1

    def serve_default_if_gone(self) -> None:
        deployments = self.call("GET", "/v1/deployments", params={"limit": 100}).json()["data"]
        if any(d["default"] and d["state"] != "failed" for d in deployments):
            return
        if self.call("GET", f"/v1/checkpoints/{self.checkpoint_id}").status_code == 404:
            torch.manual_seed(0)
            self.checkpoint_id = register_model(self.settings, GPT(TINY_LM))
        body = {"checkpoint_id": self.checkpoint_id, "default": True}
        if any(d["name"] == DEPLOYMENT for d in deployments):
            response = self.call("PATCH", f"/v1/deployments/{DEPLOYMENT}", json=body)
        else:
            response = self.call("POST", "/v1/deployments", json={"name": DEPLOYMENT, **body})
        assert response.status_code in (200, 201), response.text
        self.deployments_restored += 1


TARGET = Target()


@schemathesis.auth(refresh_interval=None)
class AdminKey:
    def get(self, case, context):
        return TARGET.key

    def set(self, case, data, context):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schemathesis.hook
def after_call(context, case, response):
    revokes_a_key = case.method.upper() == "DELETE" and case.path.startswith("/v1/api-keys")
    if response.status_code == 401 or (revokes_a_key and response.status_code < 300):
        TARGET.renew_key_if_revoked()
    changes_serving = case.method.upper() in ("PATCH", "DELETE") and case.path.startswith(
        ("/v1/deployments", "/v1/checkpoints"))
    if changes_serving and response.status_code < 300:
        TARGET.serve_default_if_gone()


@schemathesis.check
def only_declared_server_errors(ctx, response, case):
    status = response.status_code
    if status >= 500 and str(status) not in case.operation.responses.status_codes:
        raise AssertionError(f"{status} is not declared for {case.method.upper()} {case.path}: {response.text[:500]}")
