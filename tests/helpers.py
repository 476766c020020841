"""Assertions and setup shared by the tests."""

import time
import uuid

from fastapi.testclient import TestClient

from core.checkpoints import register_checkpoint
from core.db import Database
from model import GPTConfig, gpt2_tokenizer, read_metadata, save_checkpoint

TINY_LM = GPTConfig(vocab_size=50257, context_length=64, n_layer=2, n_head=4, n_embd=32)  # GPT-2's tokenizer


def assert_error(response, status: int, *words: str, param: str | None = None) -> dict:
    """The response is our JSON error with this status, its message holds the words (and names param)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"type", "message", "param"}, error
    for word in words:
        assert word in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def lenient(api) -> TestClient:
    """A client on the same running app that answers a server error as a 500 response instead of raising it."""
    return TestClient(api.app, raise_server_exceptions=False)


def upload_corpus(api, content: bytes, filename: str, kind: str) -> str:
    response = api.post("/v1/corpora", data={"kind": kind}, files={"file": (filename, content)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def add_checkpoint(api, model, label_names=None, prompt_format=None) -> str:
    """Save model into the service's data dir and register it, as a finished training job would."""
    settings = api.app.state.services.settings
    directory = save_checkpoint(settings.data_dir / f"checkpoints/test/{uuid.uuid4().hex}", model, gpt2_tokenizer(),
                                label_names=label_names, prompt_format=prompt_format)
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        checkpoint_id = register_checkpoint(session, settings.storage, directory, read_metadata(directory)).id
    database.dispose()
    return checkpoint_id


def deploy(api, name: str, checkpoint_id: str, **extra) -> dict:
    """Create a deployment and wait until it has loaded (or failed to)."""
    response = api.post("/v1/deployments", json={"name": name, "checkpoint_id": checkpoint_id, **extra})
    assert response.status_code == 201, response.text
    deadline = time.monotonic() + 30
    while (state := api.get(f"/v1/deployments/{name}").json())["state"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return state
