"""Assertions and setup shared by the API tests."""

import uuid

from fastapi.testclient import TestClient

from app.db import Database
from app.models import Checkpoint
from model import gpt2_tokenizer, save_checkpoint


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
    settings = api.app.state.settings
    relative = f"checkpoints/test/{uuid.uuid4().hex}"
    save_checkpoint(settings.data_dir / relative, model, gpt2_tokenizer(), label_names=label_names)
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        checkpoint = Checkpoint(step=1, path=relative, size_bytes=1, task="classifier" if label_names else "lm",
                                label_names=label_names, model_config=model.config.to_dict(), tokenizer_type="gpt2",
                                metrics={}, prompt_format=prompt_format)
        session.add(checkpoint)
        session.flush()
        checkpoint_id = checkpoint.id
    database.dispose()
    return checkpoint_id
