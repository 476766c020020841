import json

import pytest
import torch

from model import format_prompt, generate, gpt2_tokenizer
from tests.helpers import TINY_LM, add_checkpoint, deploy

CONFIG = TINY_LM


@pytest.fixture
def client(api, lm, live_server):
    from openai import OpenAI

    deploy(api, "chatty", add_checkpoint(api, lm, prompt_format="alpaca"))
    deploy(api, "plain", add_checkpoint(api, lm))
    return OpenAI(base_url=f"{live_server}/v1", api_key="unused", max_retries=0)


def test_models_and_completions_match_the_library(client, lm):
    assert {m.id for m in client.models.list().data} == {"chatty", "plain"}
    tokenizer = gpt2_tokenizer()
    prompt = tokenizer.encode("The sky is")
    expected = tokenizer.decode(generate(lm, torch.tensor([prompt]), 8)[0, len(prompt):].tolist())
    completion = client.completions.create(model="plain", prompt="The sky is", max_tokens=8, temperature=0)
    assert completion.choices[0].text == expected and completion.choices[0].finish_reason == "length"
    assert completion.usage.prompt_tokens == 3 and completion.usage.completion_tokens == 8
    chunks = list(client.completions.create(model="plain", prompt="The sky is", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 11


def test_n_seed_and_stop(client):
    kwargs = dict(model="plain", prompt="Hello", max_tokens=10, temperature=1.0, seed=3)
    first = client.completions.create(n=2, **kwargs)
    second = client.completions.create(n=2, **kwargs)
    assert [c.text for c in first.choices] == [c.text for c in second.choices]
    assert sorted(c.index for c in first.choices) == [0, 1] and first.usage.completion_tokens == 20
    text = first.choices[0].text
    stop = text[3:6]
    stopped = client.completions.create(stop=[stop], **kwargs)
    assert stopped.choices[0].text == text[: text.find(stop)] and stopped.choices[0].finish_reason == "stop"


def test_chat_uses_the_alpaca_template(client, lm):
    tokenizer = gpt2_tokenizer()
    prompt = format_prompt({"instruction": "Name a color.", "input": ""}) + "\n\n### Response:\n"
    ids = tokenizer.encode(prompt)
    expected_ids = generate(lm, torch.tensor([ids]), 6)[0, len(ids):].tolist()
    answer = client.chat.completions.create(model="chatty", messages=[{"role": "user", "content": "Name a color."}],
                                            max_tokens=6, temperature=0)
    expected = tokenizer.decode(expected_ids)
    assert answer.choices[0].message.content == expected.split("\n\n### ")[0]
    assert answer.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="chatty", messages=[{"role": "user", "content": "Name a color."}],
                                              max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer.choices[0].message.content


def test_openai_errors(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="plain", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="plain", prompt="word " * 80)
    with pytest.raises(openai.BadRequestError, match="user"):
        client.chat.completions.create(model="chatty", messages=[{"role": "assistant", "content": "hi"}])


def own_logprobs(lm, ids: list[int]) -> list[float]:
    """The model's own log-probability of each token after the first, given those before it."""
    with torch.no_grad():
        logprobs = torch.log_softmax(lm(torch.tensor([ids]))[0][0].float(), dim=-1)
    return [logprobs[i, ids[i + 1]].item() for i in range(len(ids) - 1)]


def test_echo_scores_the_prompt_as_the_model_does(client, lm):
    # lm-evaluation-harness's loglikelihood request: the prompt as token ids, echoed with its logprobs
    ids = gpt2_tokenizer().encode("The quick brown fox jumps over the lazy dog")
    scored = client.completions.create(model="plain", prompt=ids, max_tokens=0, echo=True, logprobs=1,
                                       temperature=0)
    choice = scored.choices[0]
    assert choice.text == "The quick brown fox jumps over the lazy dog" and choice.finish_reason == "length"
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(own_logprobs(lm, ids), abs=1e-4)
    assert "".join(choice.logprobs.tokens) == choice.text
    assert choice.logprobs.text_offset == [len("".join(choice.logprobs.tokens[:i])) for i in range(len(ids))]
    assert scored.usage.prompt_tokens == len(ids) and scored.usage.completion_tokens == 0
    # and one more token, greedy: its logprob is the largest of its top_logprobs
    more = client.completions.create(model="plain", prompt=[ids, ids[:4]], max_tokens=1, echo=True, logprobs=3,
                                     temperature=0).choices
    assert [c.index for c in more] == [0, 1] and len(more[0].logprobs.tokens) == len(ids) + 1
    assert more[0].logprobs.token_logprobs[:-1] == choice.logprobs.token_logprobs
    last, top = more[0].logprobs.token_logprobs[-1], more[0].logprobs.top_logprobs[-1]
    assert len(top) == 3 and last == pytest.approx(max(top.values()))
    assert more[1].logprobs.token_logprobs[1:4] == pytest.approx(own_logprobs(lm, ids[:4]), abs=1e-4)


def test_logprobs_streamed_and_not_say_the_same(client):
    kwargs = dict(model="plain", prompt="Once upon a", max_tokens=6, temperature=0.9, seed=5, logprobs=2)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    streamed = [c.logprobs for c in chunks if c.logprobs]
    assert [t for s in streamed for t in s.tokens] == whole.tokens
    assert [v for s in streamed for v in s.token_logprobs] == pytest.approx(whole.token_logprobs)
    assert all(len(top) in (2, 3) and whole.tokens[i] in top for i, top in enumerate(whole.top_logprobs))


def test_chat_logprobs_and_top_logprobs(client):
    messages = [{"role": "user", "content": "Name a color."}]
    answer = client.chat.completions.create(model="chatty", messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=2).choices[0]
    content = answer.logprobs.content
    assert 1 <= len(content) <= 5 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in content)  # greedy
    assert all(bytes(entry.bytes).decode("utf-8", "replace") == entry.token for entry in content)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(
        model="chatty", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        if c.choices and c.choices[0].logprobs]
    assert [e.token for s in streamed for e in s.content] == [e.token for e in content]
    plain = client.chat.completions.create(model="chatty", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_penalties_and_bias_choose_as_the_library_does(client, lm):
    from model import SamplingParams, stream_generate

    tokenizer = gpt2_tokenizer()
    params = SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.2,
                            logit_bias=((262, 5.0),))
    events = stream_generate(lm, tokenizer, tokenizer.encode("The sky is"), 12, params)
    expected = "".join(event.text for event in events)
    answer = client.completions.create(model="plain", prompt="The sky is", max_tokens=12, temperature=0,
                                       frequency_penalty=1.5, presence_penalty=0.5, logit_bias={"262": 5.0},
                                       extra_body={"repetition_penalty": 1.2})
    assert answer.choices[0].text == expected
    unpenalized = client.completions.create(model="plain", prompt="The sky is", max_tokens=12, temperature=0)
    assert unpenalized.choices[0].text != expected
    forced = client.completions.create(model="plain", prompt="The sky is", max_tokens=3, temperature=0,
                                       logit_bias={"262": 100})
    assert forced.choices[0].text == " the" * 3


def test_vllm_sampling_extras_are_reproducible_with_a_seed(client):
    kwargs = dict(model="plain", prompt="Hello", max_tokens=10, temperature=1.0, seed=11,
                  extra_body={"top_k": 20, "min_p": 0.05})
    assert client.completions.create(**kwargs).choices[0].text == client.completions.create(**kwargs).choices[0].text
    ids = gpt2_tokenizer().encode(client.completions.create(**kwargs).choices[0].text)
    stopped = client.completions.create(**{**kwargs, "extra_body": {**kwargs["extra_body"],
                                                                    "stop_token_ids": [ids[2]]}}).choices[0]
    assert stopped.finish_reason == "stop" and gpt2_tokenizer().encode(stopped.text) == ids[:2]


def test_best_of_answers_the_likeliest_of_its_samples(client):
    kwargs = dict(model="plain", prompt="Hello", max_tokens=6, temperature=1.0, seed=7, logprobs=0)
    samples = client.completions.create(n=4, **kwargs).choices
    likeliest = max(samples, key=lambda c: sum(c.logprobs.token_logprobs))
    best = client.completions.create(n=1, best_of=4, **kwargs).choices
    assert [c.text for c in best] == [likeliest.text]


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("suffix", "!"), ("frobnicate", 1), ("use_beam_search", True), ("min_tokens", 3)])
def test_a_field_not_implemented_is_refused_by_name(client, field, value):
    import openai

    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(model="plain", prompt="x", max_tokens=2, extra_body={field: value})


def test_null_and_inert_fields_are_accepted(client):
    # what the official clients send for fields left unset, and values that mean "not used"
    answer = client.chat.completions.create(
        model="chatty", messages=[{"role": "user", "content": "hi"}], max_tokens=2, user="someone",
        response_format={"type": "text"}, extra_body={"tools": None, "tool_choice": "none", "logit_bias": None,
                                                      "metadata": {"team": "a"}, "suffix": None, "best_of": 1})
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_bad_token_ids_are_refused_by_name(client):
    import openai

    for extra, field in (({"logit_bias": {"99999": 1}}, "logit_bias"), ({"logit_bias": {"x": 1}}, "logit_bias"),
                         ({"stop_token_ids": [50257]}, "stop_token_ids")):
        with pytest.raises(openai.BadRequestError, match=field):
            client.completions.create(model="plain", prompt="x", max_tokens=2, extra_body=extra)
    with pytest.raises(openai.BadRequestError, match="prompt token ids"):
        client.completions.create(model="plain", prompt=[1, 50257], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model="plain", prompt="x", n=3, best_of=2)


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "color": {"enum": ["red", "green", "blue"]}}, "required": ["name", "age", "color"], "additionalProperties": False}


def test_json_schema_output_always_parses_and_validates(client):
    import jsonschema

    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    messages = [{"role": "user", "content": "Describe someone."}]
    for seed in range(4):  # sampled, so every answer differs, and each follows the schema
        answer = client.chat.completions.create(model="chatty", messages=messages, max_tokens=60, temperature=1.0,
                                                seed=seed, response_format=response_format).choices[0]
        assert answer.finish_reason == "stop", answer
        jsonschema.validate(json.loads(answer.message.content), PERSON)
        assert list(json.loads(answer.message.content)) == ["name", "age", "color"]  # the schema's order
    streamed = client.chat.completions.create(model="chatty", messages=messages, max_tokens=60, seed=9,
                                              response_format=response_format, stream=True)
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in streamed if c.choices)), PERSON)
    anything = client.completions.create(model="plain", prompt="JSON:", max_tokens=60, temperature=0.7, seed=1,
                                         extra_body={"response_format": {"type": "json_object"}}).choices[0]
    assert anything.text.startswith("{")
    if anything.finish_reason == "stop":  # the object closed within the budget
        assert isinstance(json.loads(anything.text), dict)


def test_a_schema_without_a_grammar_is_refused_by_name(client):
    import openai

    for response_format in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "array", "uniqueItems": True}}}, {"type": "json_schema"}, {"type": "yaml"}):
        with pytest.raises(openai.BadRequestError, match="response_format"):
            client.completions.create(model="plain", prompt="x", max_tokens=5,
                                      extra_body={"response_format": response_format})
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        client.completions.create(model="plain", prompt="x", max_tokens=5, extra_body={
            "response_format": {"type": "json_object"}, "ignore_eos": True})
