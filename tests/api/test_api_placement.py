"""Where a deployment is served: its device and dtype, asked for or `auto`, reported as served, and budgeted
per device. Without a GPU here, bfloat16 runs on the CPU, and a GPU is simulated only for the budget."""

import copy
import json
import time

import torch

from model import generate, gpt2_tokenizer
from tests.helpers import TINY_LM, add_checkpoint, assert_error, deploy

PROMPT = "Once upon a time"


def greedy(model, n: int = 12) -> list[int]:
    prompt = gpt2_tokenizer().encode(PROMPT)
    return generate(model, torch.tensor([prompt]), n)[0, len(prompt):].tolist()


def generated(api) -> tuple[list[int], list[float]]:
    """The ids and logprobs of the default deployment's greedy answer."""
    response = api.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "details": True}})
    assert response.status_code == 200, response.text
    tokens = response.json()["details"]["tokens"]
    return [t["id"] for t in tokens], [t["logprob"] for t in tokens]


def served_as(api, name: str, dtype: str) -> dict:
    deadline = time.monotonic() + 30
    while (state := api.get(f"/v1/deployments/{name}").json())["served_dtype"] != dtype:
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    return state


def test_a_bfloat16_deployment_on_the_cpu_serves_what_the_library_generates_in_bfloat16(api, lm):
    state = deploy(api, "half", add_checkpoint(api, lm), dtype="bfloat16")
    assert state["state"] == "ready", state
    assert (state["device"], state["dtype"], state["served_device"], state["served_dtype"]) == (
        "auto", "bfloat16", "cpu", "bfloat16")
    info = api.get("/info").json()
    assert (info["model_dtype"], info["model_device_type"]) == ("bfloat16", "cpu")

    expected = greedy(copy.deepcopy(lm).to(torch.bfloat16))
    ids, half_logprobs = generated(api)
    assert ids == expected
    stream = api.post("/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12}})
    events = [json.loads(line[5:]) for line in stream.text.splitlines() if line.startswith("data:")]
    assert [e["token"]["id"] for e in events] == expected
    metrics = api.get("/metrics").text
    assert 'scratchllm_deployment_memory_bytes{deployment="half",device="cpu",dtype="bfloat16"}' in metrics

    assert api.patch("/v1/deployments/half", json={"dtype": "float32"}).status_code == 200
    assert served_as(api, "half", "float32")["dtype"] == "float32"
    ids, logprobs = generated(api)
    assert ids == greedy(lm) and logprobs != half_logprobs  # computed in another dtype
    metrics = api.get("/metrics").text
    assert 'dtype="float32"' in metrics and 'dtype="bfloat16"' not in metrics  # no stale series


def test_a_device_or_dtype_this_machine_cannot_serve_is_refused(api, lm):
    checkpoint = add_checkpoint(api, lm)
    for body, status, words, param in [
            ({"device": "cuda:0"}, 422, ("'cuda:0' is not on this machine", "no CUDA devices"), "device"),
            ({"device": "cuda:02"}, 422, ("'cuda:02' is not on this machine",), "device"),  # found by the fuzzer
            ({"device": "gpu"}, 422, ("device",), "device"),
            ({"device": "cuda:1234"}, 422, ("device",), "device"),
            ({"dtype": "int8"}, 422, ("dtype",), "dtype")]:
        response = api.post("/v1/deployments", json={"name": "x", "checkpoint_id": checkpoint, **body})
        assert_error(response, status, *words, param=param)
    assert api.get("/v1/deployments").json()["data"] == []
    deploy(api, "cpu", checkpoint)
    for device in ("cuda", "cuda:02"):
        assert_error(api.patch("/v1/deployments/cpu", json={"device": device}), 422, "not on this machine",
                     param="device")
    assert api.get("/v1/deployments/cpu").json()["device"] == "auto"  # unchanged


def test_deployments_on_one_gpu_share_a_fraction_of_its_memory(api, lm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr("serving.placement.device_memory_bytes", lambda device: 8 * 1024**2)
    api.app.state.services.settings.serving_gpu_memory_fraction = 0.75  # 6 MiB for deployments
    checkpoint = add_checkpoint(api, lm)  # about 3.2 MiB served in bfloat16 (no packed copy on a GPU)
    first = api.post("/v1/deployments", json={"name": "first", "checkpoint_id": checkpoint})
    assert first.status_code == 201, first.text  # (it then fails to load: this machine has no real GPU)
    second = api.post("/v1/deployments", json={"name": "second", "checkpoint_id": checkpoint})
    assert_error(second, 422, "to serve on cuda:0 bfloat16", "the other deployments on cuda:0 hold",
                 "serving_gpu_memory_fraction 0.75 of cuda:0's 8.0 MiB", param="checkpoint_id")
    beside = api.post("/v1/deployments", json={"name": "second", "checkpoint_id": checkpoint, "device": "cpu"})
    assert beside.status_code == 201, beside.text  # the CPU has a budget of its own
    assert TINY_LM.n_embd == 32  # the sizes above assume the tiny model
