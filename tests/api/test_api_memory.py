"""Memory limits of deployments: a checkpoint is served only if its weights and KV cache fit beside the others."""

import time

from core.db import Database
from core.tables import Checkpoint, Deployment
from model import GPTConfig
from tests.helpers import add_checkpoint, assert_error, deploy, local_client

# GPT-2 with a context of 524288 tokens: a KV cache of about 288 GiB for 8 sequences
LONG_CONTEXT = GPTConfig.preset("gpt2", context_length=524288).to_dict()
TINY_LM_SERVED_MIB = 12.7  # its weights (6.2 MiB), their packed copy and a KV cache of 0.25 MiB


def insert_rows(api, model_config: dict, deployment_name: str | None = None) -> str:
    """A checkpoint row (no files: a refused deployment never reads them) and, named, a deployment of it
    written straight into the table, as an older release or another API process could have left it."""
    database = Database(api.app.state.services.settings.sqlalchemy_url)
    try:
        with database.session() as session:
            checkpoint = Checkpoint(step=1, path="checkpoints/huge", size_bytes=1, task="lm", model_config=model_config,
                                    tokenizer_type="gpt2", metrics={})
            session.add(checkpoint)
            session.flush()
            if deployment_name is not None:
                session.add(Deployment(name=deployment_name, checkpoint_id=checkpoint.id, is_default=True))
            return checkpoint.id
    finally:
        database.dispose()


def test_a_deployment_whose_kv_cache_does_not_fit_is_422_with_the_estimate(api):
    huge = insert_rows(api, LONG_CONTEXT)
    error = assert_error(api.post("/v1/deployments", json={"name": "long", "checkpoint_id": huge}), 422,
                         "GiB", "8.0 GiB", "max_serving_memory_bytes", param="checkpoint_id")
    assert "KV cache" in error["message"], error
    assert_error(api.get("/v1/deployments/long"), 404)


def test_deployments_share_the_serving_memory_limit(api, lm):
    api.app.state.services.settings.max_serving_memory_bytes = 20 * 1024**2
    tiny = add_checkpoint(api, lm)
    assert deploy(api, "first", tiny)["state"] == "ready"
    assert_error(api.post("/v1/deployments", json={"name": "second", "checkpoint_id": tiny}), 422,
                 f"{TINY_LM_SERVED_MIB} MiB", "20.0 MiB", param="checkpoint_id")
    # switching a deployment does not count the checkpoint it replaces
    other = add_checkpoint(api, lm)
    assert api.patch("/v1/deployments/first", json={"checkpoint_id": other}).status_code == 200
    huge = insert_rows(api, LONG_CONTEXT)
    assert_error(api.patch("/v1/deployments/first", json={"checkpoint_id": huge}), 422, "max_serving_memory_bytes",
                 param="checkpoint_id")
    assert api.get("/v1/deployments/first").json()["checkpoint_id"] == other


def test_a_stored_deployment_past_the_limit_fails_at_start_instead_of_loading(api):
    from app.main import create_app

    insert_rows(api, LONG_CONTEXT, deployment_name="long")
    settings = api.app.state.services.settings.model_copy()
    with local_client(create_app(settings)) as restarted:
        deadline = time.monotonic() + 30
        while (state := restarted.get("/v1/deployments/long").json())["state"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert state["state"] == "failed" and state["serving_checkpoint_id"] is None, state
        assert "max_serving_memory_bytes" in state["error"] and "GiB" in state["error"], state
        assert restarted.post("/generate", json={"inputs": "Hi"}).status_code == 503
