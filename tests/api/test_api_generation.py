import json
import re
import time

import pytest
import torch

from core.db import Database
from core.tables import Checkpoint
from model import GPT, GPTClassifier, GPTConfig, generate, gpt2_tokenizer
from tests.helpers import TINY_LM, add_checkpoint, deploy, local_client

CONFIG = TINY_LM


@pytest.fixture
def served(api, lm):
    state = deploy(api, "tiny", add_checkpoint(api, lm))
    assert state["state"] == "ready" and state["default"] is True and state["task"] == "lm"
    return api


def test_generate_matches_the_library_greedy_output(served, lm):
    tokenizer = gpt2_tokenizer()
    prompt = tokenizer.encode("Once upon a time")
    expected = generate(lm, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    response = served.post("/generate", json={"inputs": "Once upon a time",
                                              "parameters": {"max_new_tokens": 12, "details": True}})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["generated_text"] == tokenizer.decode(expected)
    assert [t["id"] for t in answer["details"]["tokens"]] == expected
    assert answer["details"]["finish_reason"] == "length" and answer["details"]["generated_tokens"] == 12
    assert all(t["logprob"] <= 0 for t in answer["details"]["tokens"])
    named = served.post("/d/tiny/generate", json={"inputs": "Once upon a time", "parameters": {"max_new_tokens": 12}})
    assert named.json() == {"generated_text": answer["generated_text"]}
    full = served.post("/", json={"inputs": "Once upon a time",
                                  "parameters": {"max_new_tokens": 12, "return_full_text": True}})
    assert full.json() == [{"generated_text": "Once upon a time" + answer["generated_text"]}]


def test_a_temperature_too_small_to_sample_from_answers_greedily(served, lm):
    tokenizer = gpt2_tokenizer()
    prompt = tokenizer.encode("Once upon a time")
    expected = generate(lm, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
    for temperature in (1e-300, 5e-324):
        response = served.post("/generate", json={"inputs": "Once upon a time", "parameters": {
            "max_new_tokens": 12, "temperature": temperature, "details": True}})
        assert response.status_code == 200, response.text
        assert [t["id"] for t in response.json()["details"]["tokens"]] == expected


def test_generate_stream_sends_one_event_per_token_then_the_text(served):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 8, "do_sample": True, "seed": 7}}
    stream = served.post("/generate_stream", json=body)
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[5:]) for line in stream.text.splitlines() if line.startswith("data:")]
    assert [e["index"] for e in events] == list(range(1, 9))
    assert all(e["generated_text"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"] == {"finish_reason": "length", "generated_tokens": 8, "seed": 7}
    again = served.post("/", json={**body, "stream": True}).text
    assert [json.loads(line[5:])["token"]["id"] for line in again.splitlines() if line.startswith("data:")] == [
        e["token"]["id"] for e in events]


def test_info_and_tgi_errors(served):
    info = served.get("/info").json()
    assert info["model_id"] == "tiny" and info["max_total_tokens"] == 64
    for body, words in [({"inputs": ""}, "inputs"), ({"inputs": "x", "parameters": {"temperature": 0}}, "temperature"),
                        ({"inputs": "x", "parameters": {"top_p": 1.5}}, "top_p"),
                        ({"inputs": "x", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
                        ({"inputs": "word " * 80}, "context")]:
        for path in ("/generate", "/generate_stream"):
            response = served.post(path, json=body)
            assert response.status_code == 422, (path, body, response.text)
            assert response.json()["error_type"] == "validation" and words in response.json()["error"]
    truncated = served.post("/generate", json={"inputs": "word " * 80, "parameters": {"truncate": 20,
                                                                                       "max_new_tokens": 2}})
    assert truncated.status_code == 200
    missing = served.post("/d/nope/generate", json={"inputs": "x"})
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    bad_json = served.post("/generate", content=b"{", headers={"content-type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["error_type"] == "validation"


def test_no_deployment_is_503_and_a_classifier_refuses_generation(api):
    response = api.post("/generate", json={"inputs": "x"})
    assert response.status_code == 503 and response.json()["error"] == "no default deployment"
    torch.manual_seed(0)
    deploy(api, "spam", add_checkpoint(api, GPTClassifier(CONFIG, 2), label_names=["ham", "spam"]))
    response = api.post("/generate", json={"inputs": "x"})
    assert response.status_code == 422 and "classifier" in response.json()["error"]


def test_switching_a_deployment_and_a_failed_load_keep_serving(served, lm):
    before = served.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 5}}).json()
    torch.manual_seed(1)
    other = add_checkpoint(served, GPT(CONFIG).eval())
    assert served.patch("/v1/deployments/tiny", json={"checkpoint_id": other}).status_code == 200
    deadline = time.monotonic() + 30
    while served.get("/v1/deployments/tiny").json()["serving_checkpoint_id"] != other:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    after = served.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 5}}).json()
    assert after != before
    settings = served.app.state.services.settings
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:  # a checkpoint whose files are gone
        broken = Checkpoint(step=1, path="checkpoints/gone", size_bytes=1, task="lm", model_config={},
                            tokenizer_type="gpt2", metrics={})
        session.add(broken)
        session.flush()
        broken_id = broken.id
    database.dispose()
    served.patch("/v1/deployments/tiny", json={"checkpoint_id": broken_id})
    deadline = time.monotonic() + 30
    while (state := served.get("/v1/deployments/tiny").json())["error"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert state["state"] == "ready" and state["serving_checkpoint_id"] == other and "failed" in state["error"]
    still = served.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 5}})
    assert still.status_code == 200 and still.json() == after


def test_deployment_requests_are_checked(served):
    assert served.post("/v1/deployments", json={"name": "bad name!", "checkpoint_id": "x"}).status_code == 422
    assert served.post("/v1/deployments", json={"name": "x", "checkpoint_id": "ckpt_nope"}).status_code == 422
    dup = served.post("/v1/deployments", json={"name": "tiny", "checkpoint_id": served.get(
        "/v1/deployments/tiny").json()["checkpoint_id"]})
    assert dup.status_code == 409
    assert served.get("/v1/deployments/nope").status_code == 404
    response = served.patch("/v1/deployments/tiny", json={"default": False})
    assert response.status_code == 422 and "default" in response.json()["error"]["message"]
    checkpoint_id = served.get("/v1/deployments/tiny").json()["checkpoint_id"]
    conflict = served.delete(f"/v1/checkpoints/{checkpoint_id}")
    assert conflict.status_code == 409 and "deployed" in conflict.json()["error"]["message"]
    assert served.delete("/v1/deployments/tiny").json()["deleted"] is True
    assert served.post("/generate", json={"inputs": "x"}).status_code == 503


def test_huggingface_hub_inference_client_streams_from_the_server(served, live_server):
    from huggingface_hub import InferenceClient

    expected = served.post("/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 6}}).json()
    for url in (live_server, f"{live_server}/d/tiny"):
        client = InferenceClient(model=url)
        streamed = list(client.text_generation("Hello", max_new_tokens=6, stream=True, details=True))
        assert len(streamed) == 6
        assert streamed[-1].generated_text == expected["generated_text"]
        assert streamed[-1].details.finish_reason == "length"
        assert "".join(s.token.text for s in streamed) == expected["generated_text"]
        assert client.text_generation("Hello", max_new_tokens=6) == expected["generated_text"]


def test_tgi_prompt_details_top_tokens_and_best_of(served, lm, live_server):
    from huggingface_hub import InferenceClient

    tokenizer = gpt2_tokenizer()
    ids = tokenizer.encode("Once upon a time")
    answer = served.post("/generate", json={"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 4, "details": True, "decoder_input_details": True, "top_n_tokens": 3}}).json()
    prefill = answer["details"]["prefill"]
    assert [t["id"] for t in prefill] == ids and prefill[0]["logprob"] is None
    with torch.no_grad():
        own = torch.log_softmax(lm(torch.tensor([ids]))[0][0], dim=-1)
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx([own[i, ids[i + 1]].item() for i in range(3)],
                                                                 abs=1e-4)
    tokens, top = answer["details"]["tokens"], answer["details"]["top_tokens"]
    assert len(top) == len(tokens) == 4 and all(len(t) == 3 for t in top)
    assert all(chosen["id"] == likeliest[0]["id"] for chosen, likeliest in zip(tokens, top, strict=True))  # greedy
    client = InferenceClient(model=live_server)  # huggingface_hub reads them too
    output = client.text_generation("Once upon a time", max_new_tokens=4, details=True, decoder_input_details=True,
                                    top_n_tokens=3)
    assert [t.id for t in output.details.prefill] == ids and len(output.details.top_tokens) == 4
    streamed = list(client.text_generation("Once upon a time", max_new_tokens=4, stream=True, details=True,
                                           top_n_tokens=2))
    assert all(len(s.top_tokens) == 2 for s in streamed)

    sampled = {"max_new_tokens": 5, "do_sample": True, "seed": 3, "details": True}
    best = served.post("/generate", json={"inputs": "Hi", "parameters": {**sampled, "best_of": 3}}).json()
    others = best["details"]["best_of_sequences"]
    assert len(others) == 2
    assert sum(t["logprob"] for t in best["details"]["tokens"]) >= max(sum(t["logprob"] for t in o["tokens"])
                                                                        for o in others)
    for route, parameters, word in (("/generate", {"grammar": {"type": "json", "value": "[1"}}, "JSON Schema"),
                                    ("/generate", {"grammar": {"type": "yaml", "value": "x"}}, "grammar"),
                                    ("/generate", {"typical_p": 0.5}, "typical_p"),
                                    ("/generate", {"best_of": 2}, "needs sampling"),
                                    ("/generate_stream", {**sampled, "best_of": 2}, "cannot be streamed")):
        refused = served.post(route, json={"inputs": "Hi", "parameters": parameters})
        assert refused.status_code == 422 and word in refused.json()["error"], (parameters, refused.text)
    penalized = served.post("/generate", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": 3, "frequency_penalty": 1.0, "watermark": False, "adapter_id": None}})
    assert penalized.status_code == 200, penalized.text


def test_tgi_grammars_shape_the_output(served):
    import jsonschema

    schema = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999}},
              "required": ["id"], "additionalProperties": False}
    for value in (schema, json.dumps(schema)):  # an object, or its text
        answer = served.post("/generate", json={"inputs": "Hi", "parameters": {
            "max_new_tokens": 30, "do_sample": True, "seed": 4, "grammar": {"type": "json", "value": value}}})
        assert answer.status_code == 200, answer.text
        jsonschema.validate(json.loads(answer.json()["generated_text"]), schema)
    code = served.post("/generate", json={"inputs": "Code:", "parameters": {
        "max_new_tokens": 20, "grammar": {"type": "regex", "value": "[0-9]{3}-[a-z]{2}"}}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", code.json()["generated_text"]), code.text
    for seed in range(6):  # \d and \w are ASCII, as TGI means them, however the model samples
        sampled = served.post("/generate", json={"inputs": "Phone:", "parameters": {
            "max_new_tokens": 20, "do_sample": True, "seed": seed,
            "grammar": {"type": "regex", "value": r"\d{3} \w{2}"}}})
        assert re.fullmatch("[0-9]{3} [A-Za-z0-9_]{2}", sampled.json()["generated_text"]), sampled.text


def long_deployment(api) -> str:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, context_length=1024, n_layer=4, n_head=4, n_embd=256)  # ~3 s for 1000 tokens
    return deploy(api, "long", add_checkpoint(api, GPT(config).eval()), default=True)["name"]


def open_stream(client, max_new_tokens: int = 1000):
    """A streaming request whose first token has arrived: it holds an engine slot."""
    request = client.build_request("POST", "/generate_stream", json={"inputs": "Hi", "parameters": {
        "max_new_tokens": max_new_tokens}})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()  # kept with the response: dropping it would close the stream
    assert next(line for line in lines if line.startswith("data:"))
    return response, lines


def test_a_client_that_disconnects_is_aborted_within_a_step(api, live_server):
    import httpx

    long_deployment(api)
    engine = api.app.state.services.deployments.get("long").current.engine
    with httpx.Client(base_url=live_server, timeout=30) as client:
        response, _ = open_stream(client)
        response.close()
    deadline = time.monotonic() + 5
    while engine.load != (0, 0):
        assert time.monotonic() < deadline, "the sequence was not aborted"
        time.sleep(0.01)
    steps = engine.decode_steps
    time.sleep(0.3)
    assert engine.decode_steps == steps and steps < 900


def test_full_engine_answers_429_with_retry_after(tmp_path, database_url):
    import httpx

    from app.main import create_app
    from core.migrate import upgrade
    from core.settings import Settings

    upgrade(database_url)
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, serving_max_batch=1,
                        serving_max_queue=0, api_keys_required=False)
    with local_client(create_app(settings)) as api:
        long_deployment(api)
        busy = api.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1}})
        assert busy.status_code == 200  # the engine is free again after a short request
        import threading

        import uvicorn

        server = uvicorn.Server(uvicorn.Config(api.app, host="127.0.0.1", port=0, log_level="warning",
                                               lifespan="off"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            holder, _lines = open_stream(client)
            for path in ("/generate", "/generate_stream"):
                full = client.post(path, json={"inputs": "Hi", "parameters": {"max_new_tokens": 5}})
                assert full.status_code == 429 and full.headers["retry-after"] == "1"
                assert full.json()["error_type"] == "overloaded"
            holder.close()
        server.should_exit = True
        thread.join(10)


def test_a_request_past_its_timeout_ends_with_424_and_frees_its_slot(tmp_path, database_url):
    from app.main import create_app
    from core.migrate import upgrade
    from core.settings import Settings

    upgrade(database_url)
    settings = Settings(data_dir=tmp_path / "data", database_url=database_url, generation_timeout_s=1e-6,
                        api_keys_required=False)
    with local_client(create_app(settings)) as api:
        long_deployment(api)
        engine = api.app.state.services.deployments.get("long").current.engine
        answer = api.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 500}})
        assert answer.status_code == 424 and answer.json()["error_type"] == "generation"
        assert "no token within" in answer.json()["error"]
        stream = api.post("/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 500}})
        assert stream.status_code == 200  # admitted: the timeout comes as the stream's last event
        [event] = [json.loads(line[5:]) for line in stream.text.splitlines() if line.startswith("data:")]
        assert event["error_type"] == "generation" and "no token within" in event["error"]
        deadline = time.monotonic() + 5
        while engine.load != (0, 0):  # both sequences aborted, long before their 500 tokens
            assert time.monotonic() < deadline, "a timed-out sequence kept running"
            time.sleep(0.01)


def stream_text(api, max_new_tokens: int, stop: list[str]) -> tuple[list[str], dict]:
    """The text of every streamed token, and the last event."""
    response = api.post("/generate_stream", json={"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": max_new_tokens, "stop": stop}})
    assert response.status_code == 200, response.text
    events = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    return [e["token"]["text"] for e in events], events[-1]


def test_stop_strings_over_the_stream_never_leak_and_lose_nothing(served, lm):
    tokenizer = gpt2_tokenizer()
    prompt = tokenizer.encode("Once upon a time")
    ids = generate(lm, torch.tensor([prompt]), 24)[0, len(prompt):].tolist()
    pieces = [tokenizer.decode([i]) for i in ids]
    text = "".join(pieces)
    # a stop string made of the end of one token and the start of the next: it completes one token late
    k = next(k for k in range(4, 20) if pieces[k].strip() and pieces[k + 1].strip())
    across = pieces[k][-1] + pieces[k + 1][0]
    texts, last = stream_text(served, 24, [across])
    assert "".join(texts) == last["generated_text"] == text[: text.find(across)]
    assert last["details"]["finish_reason"] == "stop_sequence" and all(across not in t for t in texts)
    # a prefix of the stop string shows up but the string never completes: the held-back text comes out
    unfinished = text[10:12] + "\u2603\u2603"
    texts, last = stream_text(served, 24, [unfinished])
    assert "".join(texts) == last["generated_text"] == text and last["details"]["finish_reason"] == "length"
    # the first token completes the stop string: nothing is sent but the end
    texts, last = stream_text(served, 24, [pieces[0]])
    assert "".join(texts) == last["generated_text"] == "" and last["details"]["finish_reason"] == "stop_sequence"


def test_classify_single_and_batched_inputs(api):
    torch.manual_seed(0)
    classifier = GPTClassifier(CONFIG, 2).eval()
    deploy(api, "spam", add_checkpoint(api, classifier, label_names=["ham", "spam"]))
    texts = ["Free entry in a weekly competition!", "See you at lunch?", "ok"]
    response = api.post("/classify", json={"input": texts})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    tokenizer = gpt2_tokenizer()
    for item, text in zip(data, texts, strict=True):
        ids = torch.tensor([tokenizer.encode(text)])
        expected = classifier.predict_proba(ids)[0].tolist()
        assert item["probs"] == pytest.approx(expected, abs=1e-5)
        assert item["label"] == ["ham", "spam"][int(torch.tensor(expected).argmax())] and item["num_classes"] == 2
        assert set(item["probabilities"]) == {"ham", "spam"}
    single = api.post("/classify", json={"input": texts[0], "model": "spam"}).json()["data"]
    assert single[0]["probs"] == pytest.approx(data[0]["probs"], abs=1e-5)
    too_long = api.post("/classify", json={"input": "word " * 100})
    assert too_long.status_code == 422 and "truncate" in too_long.json()["error"]["message"]
    assert api.post("/classify", json={"input": "word " * 100, "truncate": True}).status_code == 200
    assert api.post("/classify", json={"input": []}).status_code == 422
    assert api.post("/classify", json={"input": "x", "model": "nope"}).status_code == 404
    deploy(api, "lm", add_checkpoint(api, GPT(CONFIG)))
    wrong = api.post("/classify", json={"input": "x", "model": "lm"})
    assert wrong.status_code == 422 and "language model" in wrong.json()["error"]["message"]


def test_health_follows_the_default_deployment_and_metrics_count(api, lm):
    response = api.get("/health")
    assert response.status_code == 503 and response.json()["error"]["message"] == "no default deployment"
    checkpoint_id = add_checkpoint(api, lm)
    deploy(api, "tiny", checkpoint_id)
    assert api.get("/health").json() == {"status": "ok"}  # public: it names no deployment or checkpoint
    api.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 4}})
    api.post("/generate", json={"inputs": ""})
    streamed = api.post("/d/tiny/generate_stream", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}})
    assert streamed.text.count("data:") == 2
    assert api.get("/no/such/path").status_code == 404
    text = api.get("/metrics").text
    assert 'scratchllm_http_requests_total{method="POST",route="/generate",status="200"} 1.0' in text
    assert 'scratchllm_http_requests_total{method="POST",route="/generate",status="422"} 1.0' in text
    assert 'scratchllm_http_requests_total{method="POST",route="/generate_stream",status="200"} 1.0' in text
    assert 'scratchllm_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'scratchllm_generated_tokens_total{deployment="tiny"} 6.0' in text
    assert 'scratchllm_time_to_first_token_seconds_count{deployment="tiny"} 2.0' in text
    assert 'scratchllm_inter_token_latency_seconds_count{deployment="tiny"} 4.0' in text
    assert 'scratchllm_running_sequences{deployment="tiny"} 0.0' in text
    assert 'scratchllm_queue_depth{deployment="tiny"} 0.0' in text


def test_a_change_through_one_api_process_reaches_another(api, lm, tmp_path):
    from app.main import create_app
    from core.settings import Settings

    settings = api.app.state.services.settings
    other_settings = Settings(data_dir=settings.data_dir, database_url=settings.sqlalchemy_url,
                              deployment_sync_interval_s=0.2, api_keys_required=False)
    with local_client(create_app(other_settings)) as other:
        assert other.post("/generate", json={"inputs": "x"}).status_code == 503
        deploy(api, "tiny", add_checkpoint(api, lm))
        deadline = time.monotonic() + 30
        while other.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the other API process never loaded the deployment"
            time.sleep(0.1)
        answer = other.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 5}})
        assert answer.json() == api.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 5}}).json()


def test_switching_under_load_fails_no_request(served, live_server):
    import concurrent.futures

    import httpx

    torch.manual_seed(2)
    checkpoints = [add_checkpoint(served, GPT(CONFIG).eval()) for _ in range(2)]
    stop = time.monotonic() + 6
    statuses: list[int] = []

    def client_loop(seed: int) -> None:
        with httpx.Client(base_url=live_server, timeout=30) as client:
            while time.monotonic() < stop:
                path = "/generate_stream" if seed % 2 else "/generate"
                response = client.post(path, json={"inputs": "Hello there", "parameters": {"max_new_tokens": 20}})
                statuses.append(response.status_code)
                if path == "/generate_stream":
                    assert response.text.rstrip().splitlines()[-1].startswith("data:")
                    assert '"generated_text":' in response.text.rstrip().splitlines()[-1]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client_loop, seed) for seed in range(4)]
        for checkpoint_id in checkpoints * 2:
            time.sleep(1)
            assert served.patch("/v1/deployments/tiny", json={"checkpoint_id": checkpoint_id}).status_code == 200
        for future in futures:
            future.result()
    assert statuses and set(statuses) == {200}
