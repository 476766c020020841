"""/tokenize in vLLM's and TGI's shapes (the body tells which), /detokenize in vLLM's, and TGI's
/d/{deployment}/tokenize."""

from dataclasses import replace

import pytest

from model import GPT, PROMPT_FORMAT, GPTClassifier, format_prompt, gpt2_tokenizer
from model.tokenizer import ENDOFTEXT, bpe_tokenizer
from tests.helpers import TINY_LM, add_checkpoint, assert_error, deploy, register_model

GPT2 = gpt2_tokenizer()
BYTE_LEVEL = replace(TINY_LM, vocab_size=257)  # a token per byte, and <|endoftext|>


@pytest.fixture
def served(api, lm):
    deploy(api, "tiny", add_checkpoint(api, lm))  # the first deployment: the default one
    return api


def add_byte_level_checkpoint(api) -> str:
    """A checkpoint whose tokenizer has no merges: each UTF-8 byte is a token, its id the byte."""
    tokenizer = bpe_tokenizer([bytes([b]) for b in range(256)], {ENDOFTEXT: 256})
    return register_model(api.app.state.services.settings, GPT(BYTE_LEVEL), tokenizer=tokenizer)


def tgi_error(response, status: int, word: str, error_type: str = "validation") -> None:
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type and word in response.json()["error"], response.text


def test_vllm_tokenize_answers_the_ids_a_prompt_is_generated_from(served):
    text = "The sky is blue <|endoftext|>"
    ids = GPT2.encode(text, allow_special=False)  # special-token text is plain text in a prompt
    answer = served.post("/tokenize", json={"prompt": text})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"count": len(ids), "max_model_len": 64, "tokens": ids, "token_strs": None}
    named = served.post("/tokenize", json={"model": "tiny", "prompt": text, "add_special_tokens": True,
                                           "return_token_strs": True})
    assert named.json()["tokens"] == ids and named.json()["token_strs"] == [GPT2.decode([i]) for i in ids]
    longer = served.post("/tokenize", json={"prompt": " word" * 100}).json()  # longer than the context: counted
    assert longer["count"] == 100 > longer["max_model_len"]


def test_chat_messages_are_tokenized_through_the_chat_template(api, lm):
    deploy(api, "chatty", add_checkpoint(api, lm, prompt_format=PROMPT_FORMAT))
    deploy(api, "plain", add_checkpoint(api, lm))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    prompt = "Be brief.\n\n" + format_prompt({"instruction": "Name a color."})
    answer = api.post("/tokenize", json={"model": "chatty", "messages": messages}).json()
    assert answer["tokens"] == GPT2.encode(prompt + "\n\n### Response:\n")
    chat = api.post("/v1/chat/completions", json={"model": "chatty", "messages": messages, "max_tokens": 1})
    assert chat.json()["usage"]["prompt_tokens"] == answer["count"]
    bare = api.post("/tokenize", json={"model": "chatty", "messages": messages, "add_generation_prompt": False})
    assert bare.json()["tokens"] == GPT2.encode(prompt)
    assert_error(api.post("/tokenize", json={"model": "plain", "messages": messages}), 400, "no chat template",
                 param="model")
    answered = [*messages, {"role": "assistant", "content": "Blue."}]
    assert_error(api.post("/tokenize", json={"model": "chatty", "messages": answered}), 400, "user",
                 param="messages")


def test_detokenize_round_trips_any_text(served):
    for text in ("Hello, world!", "naïve café — 東京 🤗", "<|endoftext|> is text here", " \n\t "):
        ids = served.post("/tokenize", json={"prompt": text}).json()["tokens"]
        assert served.post("/detokenize", json={"tokens": ids}).json() == {"prompt": text}
    assert served.post("/detokenize", json={"model": "tiny", "tokens": []}).json() == {"prompt": ""}
    assert served.post("/detokenize", json={"tokens": [GPT2.eot_id]}).json() == {"prompt": ENDOFTEXT}
    for bad in (50257, -1, 10**30):
        assert_error(served.post("/detokenize", json={"tokens": [15496, bad]}), 400, f"token id {bad} ",
                     "0 to 50256", param="tokens")
    assert_error(served.post("/detokenize", json={"tokens": ["a"]}), 400, param="tokens.0")
    assert_error(served.post("/detokenize", json={"model": "nope", "tokens": [1]}), 404, "nope", param="model")


def test_tgi_tokenize_offsets_slice_the_input_into_each_tokens_text(served):
    text = "Hi wörld 🤗!"
    tokens = served.post("/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in tokens] == GPT2.encode(text)
    assert all(t["text"] == text[t["start"]:t["stop"]] for t in tokens)
    # GPT-2 splits the emoji's four bytes over three tokens: each spans the whole character, as TGI's offsets do
    emoji = text.index("🤗")
    assert [(t["text"], t["start"], t["stop"]) for t in tokens if t["start"] <= emoji < t["stop"]] == [
        (" 🤗", emoji - 1, emoji + 1), ("🤗", emoji, emoji + 1), ("🤗", emoji, emoji + 1)]
    assert [t["start"] for t in tokens] == sorted(t["start"] for t in tokens) and tokens[-1]["stop"] == len(text)
    truncated = served.post("/tokenize", json={"inputs": text, "parameters": {"truncate": 3}})
    assert truncated.json() == tokens[-3:]
    assert served.post("/d/tiny/tokenize", json={"inputs": text}).json() == tokens


def test_d_name_tokenize_and_model_pick_that_deployment(served):
    deploy(served, "bytes", add_byte_level_checkpoint(served))
    assert served.post("/d/bytes/tokenize", json={"inputs": "é!"}).json() == [
        {"id": 0xC3, "text": "é", "start": 0, "stop": 1}, {"id": 0xA9, "text": "é", "start": 0, "stop": 1},
        {"id": ord("!"), "text": "!", "start": 1, "stop": 2}]
    assert [t["id"] for t in served.post("/tokenize", json={"inputs": "é!"}).json()] == GPT2.encode("é!")
    vllm = served.post("/tokenize", json={"model": "bytes", "prompt": "é!"}).json()
    assert vllm["tokens"] == [0xC3, 0xA9, ord("!")]
    assert served.post("/detokenize", json={"model": "bytes", "tokens": [0xC3, 0xA9, 256]}).json() == {
        "prompt": "é" + ENDOFTEXT}
    assert_error(served.post("/detokenize", json={"model": "bytes", "tokens": [257]}), 400, "257", param="tokens")
    tgi_error(served.post("/d/nope/tokenize", json={"inputs": "é!"}), 404, "nope", "not_found")
    tgi_error(served.post("/d/bytes/tokenize", json={"prompt": "é!"}), 422, "inputs")


def test_a_classifier_deployment_is_tokenized_too(api):
    deploy(api, "spam", add_checkpoint(api, GPTClassifier(TINY_LM, 2).eval(), label_names=["ham", "spam"]))
    answer = api.post("/tokenize", json={"model": "spam", "prompt": "Free entry!"}).json()
    assert answer == {"count": 3, "max_model_len": 64, "tokens": GPT2.encode("Free entry!"), "token_strs": None}
    assert [t["id"] for t in api.post("/d/spam/tokenize", json={"inputs": "Free entry!"}).json()] == answer["tokens"]
    messages = [{"role": "user", "content": "Hi"}]
    assert_error(api.post("/tokenize", json={"model": "spam", "messages": messages}), 400, "no chat template")


def test_a_body_in_neither_shape_or_both_is_refused_naming_the_fields(served):
    for body, words in [({"inputs": "a", "prompt": "b"}, "inputs and prompt"),
                        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt and messages"),
                        ({"model": "tiny"}, "one of inputs"), ([{"prompt": "a"}], "JSON object")]:
        assert_error(served.post("/tokenize", json=body), 422, words, param="body")
    tgi_error(served.post("/tokenize", json={"inputs": ""}), 422, "inputs")
    tgi_error(served.post("/tokenize", json={"inputs": "a", "parameters": {"truncate": 0}}), 422, "truncate")
    assert_error(served.post("/tokenize", json={"prompt": 5}), 400, param="prompt")
    assert_error(served.post("/tokenize", json={"messages": []}), 400, param="messages")
    assert_error(served.post("/tokenize", json={"model": "nope", "prompt": "a"}), 404, "nope", param="model")


def test_no_default_deployment_is_503_in_each_shape(api):
    assert_error(api.post("/tokenize", json={"prompt": "a"}), 503, "no default deployment")
    tgi_error(api.post("/tokenize", json={"inputs": "a"}), 503, "no default deployment", "unavailable")
    assert_error(api.post("/detokenize", json={"tokens": [1]}), 503, "no default deployment")


def test_texts_past_the_size_limit_are_refused_before_tokenizing(api, lm, monkeypatch):
    deploy(api, "chatty", add_checkpoint(api, lm, prompt_format=PROMPT_FORMAT))
    services = api.app.state.services
    limit = services.settings.serving_max_prompt_chars

    def never(*_args, **_kwargs):
        raise AssertionError("tokenized")

    monkeypatch.setattr(services.deployments.get("chatty").current.tokenizer, "encode", never)
    over = "a" * (limit + 1)
    assert_error(api.post("/tokenize", json={"prompt": over}), 413, f"at most {limit}", param="prompt")
    messages = [{"role": "user", "content": over}]
    assert_error(api.post("/tokenize", json={"messages": messages}), 413, f"at most {limit}", param="messages")
    for path in ("/tokenize", "/d/chatty/tokenize"):
        tgi_error(api.post(path, json={"inputs": over}), 413, f"at most {limit}")
    too_many = api.post("/detokenize", json={"tokens": [64] * (limit + 1)})
    assert_error(too_many, 413, f"at most {limit}", param="tokens")


def test_the_openapi_document_describes_the_bodies_and_answers(served):
    paths = served.get("/openapi.json").json()["paths"]

    def refs(schema: dict) -> set[str]:
        inner = schema.get("anyOf", [schema])
        return {s.get("$ref", s.get("items", {}).get("$ref", "")).rsplit("/", 1)[-1] for s in inner}

    tokenize = paths["/tokenize"]["post"]
    assert refs(tokenize["requestBody"]["content"]["application/json"]["schema"]) == {
        "GenerateRequest", "PromptTokenize", "ChatTokenize"}
    assert refs(tokenize["responses"]["200"]["content"]["application/json"]["schema"]) == {"Tokens", "TGIToken"}
    assert {"400", "404", "413", "422", "503"} <= set(tokenize["responses"])
    named = paths["/d/{deployment}/tokenize"]["post"]
    assert refs(named["responses"]["200"]["content"]["application/json"]["schema"]) == {"TGIToken"}
    assert "/d/{deployment}/detokenize" not in paths
    assert "503" in paths["/detokenize"]["post"]["responses"]
