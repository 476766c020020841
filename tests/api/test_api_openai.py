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
