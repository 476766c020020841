"""The judge's HTTP call: checked before it connects, to the address checked, with the key as a bearer token;
an answer capped in size and never quoted in an error."""

import functools

import pytest

from core import outbound
from tests.helpers import chat_completion, recording_server
from worker import judge as judge_module
from worker.judge import MAX_ANSWER_BYTES, MAX_REPLY_CHARS, Judge, JudgeError

RECORD = {"instruction": "Give the number.", "input": "", "output": "85"}


def rate(url: str, allowed_hosts=None, api_key: str | None = None) -> tuple[int | None, str]:
    judge = Judge(f"{url}/v1", "m", api_key, timeout_s=5,
                  allowed_hosts=[url.removeprefix("http://")] if allowed_hosts is None else allowed_hosts)
    try:
        return judge.rate(RECORD, "85")
    finally:
        judge.close()


def test_the_key_is_sent_as_a_bearer_token_and_the_reply_scored():
    with recording_server(chat_completion("85")) as (url, received):
        assert rate(url, api_key="sk-judge-secret") == (85, "85")
    assert received[0]["Authorization"] == "Bearer sk-judge-secret"


def test_a_host_not_allowed_is_refused_before_any_connection():
    with recording_server(chat_completion("85")) as (url, received), pytest.raises(JudgeError, match="refused"):
        rate(url, allowed_hosts=[])
    assert received == []


def test_the_connection_goes_to_the_address_checked_under_the_name_asked_for(monkeypatch):
    """A name the system cannot resolve is reached at the address the check resolved it to."""
    monkeypatch.setattr(outbound, "is_public", lambda _address: True)  # the test server is on loopback
    monkeypatch.setattr(judge_module, "destination",
                        functools.partial(outbound.destination, resolve=lambda _host, _port: ["127.0.0.1"]))
    with recording_server(chat_completion("85")) as (url, received):
        port = url.rpartition(":")[2]
        assert rate(f"http://judge.invalid:{port}", allowed_hosts=[]) == (85, "85")
    assert received[0]["Host"] == f"judge.invalid:{port}"


def test_an_answer_past_the_size_limit_is_an_error():
    with recording_server(chat_completion("85" + " " * MAX_ANSWER_BYTES)) as (url, _), \
            pytest.raises(JudgeError, match=f"more than {MAX_ANSWER_BYTES} bytes"):
        rate(url)


def test_a_long_reply_is_kept_in_part():
    with recording_server(chat_completion("85" + "!" * 2 * MAX_REPLY_CHARS)) as (url, _):
        score, reply = rate(url)
    assert score == 85 and len(reply) == MAX_REPLY_CHARS


@pytest.mark.parametrize("status, body, words", [
    (500, b"SECRET internal details", "answered HTTP 500"),
    (200, b'{"SECRET": "not a completion"}', "did not answer with a chat completion"),
    (200, b"SECRET, not JSON", "did not answer with a chat completion"),
    (200, b'{"choices": [{"message": {"content": {"SECRET": 1}}}]}', "did not answer with a chat completion"),
    (200, b"[" * 50_000 + b'"SECRET"', "did not answer with a chat completion"),  # past the recursion limit
])
def test_an_error_names_the_failure_and_never_quotes_the_answer(status, body, words):
    with recording_server(body, status) as (url, _), pytest.raises(JudgeError) as failure:
        rate(url)
    assert words in str(failure.value) and "SECRET" not in str(failure.value)


def test_redirects_are_not_followed():
    with recording_server(chat_completion("85"), 307, {"location": "/elsewhere"}) as (url, received), \
            pytest.raises(JudgeError, match="answered HTTP 307"):
        rate(url)
    assert len(received) == 1
