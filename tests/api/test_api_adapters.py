"""LoRA adapters served per request over one deployed base: `<deployment>:<adapter>` (or the adapter's bare name)
as the model, TGI's adapter_id, requests for different adapters in one batch."""

import threading

import pytest
import torch

from model import GPT, PROMPT_FORMAT, generate, gpt2_tokenizer
from model.lora import LORA_TARGETS
from tests.helpers import TINY_LM, add_adapter, add_checkpoint, assert_error, deploy

PROMPT = "Once upon a time"
TOKENS = 10


def greedy(model: GPT, prompt: str = PROMPT) -> str:
    tokenizer = gpt2_tokenizer()
    ids = tokenizer.encode(prompt)
    return tokenizer.decode(generate(model, torch.tensor([ids]), TOKENS)[0, len(ids):].tolist())


@pytest.fixture
def adapters(api, lm):
    """A base deployment `tiny` serving adapters `small` (rank 2, attention only) and `chat` (rank 8, every target,
    instruction-finetuned); the models each should answer like."""
    base, settings = add_checkpoint(api, lm), api.app.state.services.settings
    small, small_model = add_adapter(settings, base, lm, seed=1, rank=2, targets=("c_attn",))
    chat, chat_model = add_adapter(settings, base, lm, seed=2, rank=8, targets=LORA_TARGETS,
                                   prompt_format=PROMPT_FORMAT)
    state = deploy(api, "tiny", base, adapters={"small": small, "chat": chat})
    assert state["state"] == "ready", state
    assert state["adapters"] == state["serving_adapters"] == {"chat": chat, "small": small}
    expected = {"tiny": greedy(lm), "tiny:small": greedy(small_model), "tiny:chat": greedy(chat_model)}
    assert len(set(expected.values())) == 3, "the adapters must change the answers for the test to tell them apart"
    return {"base": base, "small": small, "chat": chat, "expected": expected, "chat_model": chat_model}


def complete(api, model: str, prompt: str = PROMPT):
    return api.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": TOKENS,
                                             "temperature": 0})


def test_each_adapter_answers_as_its_merged_model_would(api, adapters):
    for model, text in adapters["expected"].items():
        answer = complete(api, model)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == text and answer.json()["model"] == model
    assert complete(api, "small").json()["choices"][0]["text"] == adapters["expected"]["tiny:small"]  # bare name

    tgi = api.post("/d/tiny:chat/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": TOKENS}})
    assert tgi.json() == {"generated_text": adapters["expected"]["tiny:chat"]}
    by_id = api.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": TOKENS,
                                                                         "adapter_id": "small"}})
    assert by_id.json() == {"generated_text": adapters["expected"]["tiny:small"]}
    info = api.get("/d/tiny:small/info").json()
    assert info["model_id"] == "tiny:small" and info["model_sha"] == adapters["small"]


def test_requests_for_different_adapters_decode_together(api, adapters):
    engine = api.app.state.services.deployments.get("tiny").current.engine
    steps_before = engine.decode_steps
    answers: dict[str, list[str]] = {model: [] for model in adapters["expected"]}
    start = threading.Barrier(6)

    def ask(model: str) -> None:
        start.wait()
        answers[model].append(complete(api, model).json()["choices"][0]["text"])

    threads = [threading.Thread(target=ask, args=(model,)) for model in adapters["expected"] for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == {model: [text, text] for model, text in adapters["expected"].items()}
    assert engine.decode_steps - steps_before < 6 * TOKENS  # some steps decoded several of them at once


def test_models_lists_adapters_and_chat_uses_the_adapters_template(api, adapters):
    listed = {m["id"]: m for m in api.get("/v1/models").json()["data"]}
    assert listed["tiny"]["parent"] is None and listed["tiny"]["root"] == adapters["base"]
    assert listed["tiny:small"]["parent"] == "tiny" and listed["tiny:small"]["root"] == adapters["small"]
    assert listed["tiny:chat"]["root"] == adapters["chat"]

    chat = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0}
    answer = api.post("/v1/chat/completions", json={"model": "tiny:chat", **chat})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "tiny:chat"
    assert_error(api.post("/v1/chat/completions", json={"model": "tiny", **chat}), 400, "no chat template")
    assert_error(api.post("/v1/chat/completions", json={"model": "tiny:small", **chat}), 400, "tiny:small",
                 "no chat template")


def test_models_that_do_not_resolve_are_named(api, adapters, lm):
    assert_error(complete(api, "tiny:nope"), 404, "tiny", "'nope'", "chat, small")
    assert_error(complete(api, "nope"), 404, "'nope'")
    assert_error(complete(api, "gone:small"), 404, "'gone'")
    twin = deploy(api, "twin", adapters["base"], adapters={"small": adapters["small"]})
    assert twin["adapters"] == {"small": adapters["small"]}
    assert_error(complete(api, "small"), 400, "tiny, twin", "twin:small")
    assert complete(api, "twin:small").json()["choices"][0]["text"] == adapters["expected"]["tiny:small"]
    missing = api.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "nope"}})
    assert missing.status_code == 404 and "'nope'" in missing.json()["error"], missing.text  # TGI's error shape
    twice = api.post("/d/tiny:small/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": "chat"}})
    assert twice.status_code == 422 and "adapter_id" in twice.json()["error"], twice.text


def test_adapters_are_checked_when_deployed(api, adapters, lm):
    other_base = add_checkpoint(api, GPT(TINY_LM))
    foreign, _ = add_adapter(api.app.state.services.settings, other_base, GPT(TINY_LM), seed=3, rank=2)
    post = {"name": "other", "checkpoint_id": adapters["base"]}
    assert_error(api.post("/v1/deployments", json={**post, "adapters": {"x": other_base}}), 422, "not adapter-only",
                 param="adapters.x")
    assert_error(api.post("/v1/deployments", json={**post, "adapters": {"x": foreign}}), 422, other_base,
                 adapters["base"], param="adapters.x")
    assert_error(api.post("/v1/deployments", json={**post, "adapters": {"x": "ckpt_nope"}}), 422, "ckpt_nope",
                 param="adapters.x")
    assert api.post("/v1/deployments", json={**post, "adapters": {"a:b": adapters["small"]}}).status_code == 422
    assert api.get("/v1/deployments/other").status_code == 404

    # the adapters were trained over the base: switching the checkpoint under them is refused, unless they go too
    assert_error(api.patch("/v1/deployments/tiny", json={"checkpoint_id": other_base}), 422, "{}", param="adapters")
    assert api.get("/v1/deployments/tiny").json()["checkpoint_id"] == adapters["base"]
    moved = api.patch("/v1/deployments/tiny", json={"checkpoint_id": other_base, "adapters": {"x": foreign}})
    assert moved.status_code == 200, moved.text
    assert moved.json()["adapters"] == {"x": foreign}
    renamed = api.patch("/v1/deployments/tiny", json={"checkpoint_id": adapters["base"],
                                                      "adapters": {"x": adapters["small"]}})
    assert renamed.json()["adapters"] == {"x": adapters["small"]}
    assert api.patch("/v1/deployments/tiny", json={"adapters": {}}).json()["adapters"] == {}


def test_adapter_checkpoints_and_their_base_are_kept_while_needed(api, adapters):
    checkpoint = api.get(f"/v1/checkpoints/{adapters['small']}").json()
    assert checkpoint["adapter_of_id"] == checkpoint["parent_id"] == adapters["base"]
    assert checkpoint["size_bytes"] < api.get(f"/v1/checkpoints/{adapters['base']}").json()["size_bytes"] / 20
    assert_error(api.delete(f"/v1/checkpoints/{adapters['small']}"), 409, "adapter of deployment", "tiny")
    api.patch("/v1/deployments/tiny", json={"adapters": {"chat": adapters["chat"]}})
    assert api.delete(f"/v1/checkpoints/{adapters['small']}").status_code == 200
    api.delete("/v1/deployments/tiny")
    assert_error(api.delete(f"/v1/checkpoints/{adapters['base']}"), 409, adapters["chat"], "delete them first")
    assert api.delete(f"/v1/checkpoints/{adapters['chat']}").status_code == 200
    assert api.delete(f"/v1/checkpoints/{adapters['base']}").status_code == 200


def test_an_adapter_checkpoint_deployed_alone_serves_its_merged_model(api, adapters):
    state = deploy(api, "merged", adapters["chat"])
    assert state["state"] == "ready", state
    assert complete(api, "merged").json()["choices"][0]["text"] == adapters["expected"]["tiny:chat"]
