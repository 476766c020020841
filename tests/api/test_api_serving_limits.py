"""What one request may cost the others: prompts are bounded in size before they are tokenized, and a
deployment runs a bounded number of classification batches at once."""

import threading
from concurrent.futures import ThreadPoolExecutor

from model import PROMPT_FORMAT, GPTClassifier
from tests.helpers import TINY_LM, add_checkpoint, assert_error, deploy


def note_tokenized(monkeypatch, tokenizer, lengths: list[int]) -> None:
    """Note the length of every text the tokenizer encodes."""
    encode, encode_batch = tokenizer.encode, tokenizer.encode_batch

    def noted_encode(text, **kwargs):
        lengths.append(len(text))
        return encode(text, **kwargs)

    def noted_encode_batch(texts, **kwargs):
        lengths.extend(len(text) for text in texts)
        return encode_batch(texts, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", noted_encode)
    monkeypatch.setattr(tokenizer, "encode_batch", noted_encode_batch)


def test_prompts_past_the_size_limit_are_refused_before_tokenizing(api, lm, monkeypatch):
    deploy(api, "tiny", add_checkpoint(api, lm, prompt_format=PROMPT_FORMAT))
    deploy(api, "spam", add_checkpoint(api, GPTClassifier(TINY_LM, 2).eval(), label_names=["ham", "spam"]))
    services = api.app.state.services
    limit = services.settings.serving_max_prompt_chars
    tokenized = []
    for name in ("tiny", "spam"):
        note_tokenized(monkeypatch, services.deployments.get(name).current.tokenizer, tokenized)
    over = "a" * (limit + 1)
    for path in ("/generate", "/generate_stream", "/"):
        response = api.post(path, json={"inputs": over})
        assert response.status_code == 413, response.text
        assert response.json()["error_type"] == "validation" and f"at most {limit}" in response.json()["error"]
    assert_error(api.post("/v1/completions", json={"model": "tiny", "prompt": over}), 413, f"at most {limit}",
                 param="prompt")
    chat = api.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": over}]})
    assert_error(chat, 413, f"at most {limit}", param="prompt")
    classify = api.post("/classify", json={"model": "spam", "input": ["ok", over], "truncate": True})
    assert_error(classify, 413, "input 1", f"at most {limit}", param="input")
    assert tokenized == []
    # at the limit the prompt is tokenized, and then too long for this model's context
    at_limit = api.post("/generate", json={"inputs": "a" * limit})
    assert at_limit.status_code == 422 and "tokens" in at_limit.json()["error"]
    assert tokenized == [limit]


def test_classification_batches_past_the_limit_answer_429_with_retry_after(api, monkeypatch):
    deploy(api, "spam", add_checkpoint(api, GPTClassifier(TINY_LM, 2).eval(), label_names=["ham", "spam"]))
    services = api.app.state.services
    limit = services.settings.serving_max_classify_batches
    model = services.deployments.get("spam").current.model
    predict, started, release = model.predict_proba, threading.Semaphore(0), threading.Event()

    def held(*args):
        started.release()
        release.wait(10)
        return predict(*args)

    monkeypatch.setattr(model, "predict_proba", held)
    body = {"model": "spam", "input": "Free entry in a weekly competition!"}
    with ThreadPoolExecutor(limit) as pool:
        running = [pool.submit(api.post, "/classify", json=body) for _ in range(limit)]
        assert all(started.acquire(timeout=30) for _ in range(limit))
        full = api.post("/classify", json=body)
        release.set()
        assert [r.result().status_code for r in running] == [200] * limit
    assert_error(full, 429, "overloaded", f"{limit} classification batches", param="model")
    assert full.headers["retry-after"] == "1"
    assert api.post("/classify", json=body).status_code == 200  # the batches' places are free again


def test_stop_strings_past_their_size_limit_are_refused(api, lm):
    from serving.client import MAX_STOP_CHARS

    deploy(api, "tiny", add_checkpoint(api, lm), default=True)
    long_stop = "x" * (MAX_STOP_CHARS + 1)
    tgi = api.post("/generate", json={"inputs": "Hi", "parameters": {"stop": [long_stop]}})
    assert tgi.status_code == 422 and "256" in tgi.json()["error"]
    for stop in (long_stop, ["a", long_stop]):
        openai = api.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "stop": stop})
        assert openai.status_code == 400 and openai.json()["error"]["param"].startswith("stop"), openai.text
    fine = api.post("/generate", json={"inputs": "Hi", "parameters": {"stop": ["x" * MAX_STOP_CHARS],
                                                                        "max_new_tokens": 2}})
    assert fine.status_code == 200, fine.text
