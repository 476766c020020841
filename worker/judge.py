"""Rating instruction responses with any OpenAI-compatible chat endpoint (the book's LLM-as-judge)."""

import contextlib
from collections.abc import Sequence

import httpx

from core.outbound import RefusedURL, destination
from model.evaluation import judge_prompt, parse_judge_score
from model.json_text import parse_json

REPLY_TOKENS = 32  # "85" is the answer asked for; chatty judges get room for a short sentence around it
MAX_ANSWER_BYTES = 64 * 1024  # a chat completion of REPLY_TOKENS tokens takes well under 1 KiB
MAX_REPLY_CHARS = 500  # of the judge's reply, kept with each example


class JudgeError(RuntimeError):
    """The judge could not be asked: refused, unreachable, or an answer that is not a chat completion. The
    message never quotes the answer: it is shown to every reader of the evaluation."""


class Judge:
    def __init__(self, url: str, model: str, api_key: str | None, timeout_s: float,
                 allowed_hosts: Sequence[str] = ()):
        self.url, self.model, self.allowed_hosts = url.rstrip("/"), model, allowed_hosts
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # no proxy from the environment: the connection goes to the address checked, and redirects are not
        # followed, since their target would not be checked
        self.client = httpx.Client(headers=headers, timeout=timeout_s, follow_redirects=False, trust_env=False)

    def close(self) -> None:
        self.client.close()

    def rate(self, record: dict, response: str) -> tuple[int | None, str]:
        """(score 0-100 or None when the reply holds none, the judge's reply)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": judge_prompt(record, response)}],
                "temperature": 0, "seed": 123, "max_tokens": REPLY_TOKENS}
        reply = self._reply(self._post(body))
        return parse_judge_score(reply), reply[:MAX_REPLY_CHARS]

    def _post(self, body: dict) -> bytes:
        """The judge's answer, at most MAX_ANSWER_BYTES; the URL is checked before every request (DNS changes)."""
        try:
            target = destination(f"{self.url}/chat/completions", self.allowed_hosts)
        except RefusedURL as e:
            raise JudgeError(f"the judge at {self.url} is refused: {e}") from e
        try:
            with self.client.stream("POST", target.url, json=body, headers={"Host": target.host},
                                    extensions={"sni_hostname": target.server_name}) as answer:
                if answer.status_code != 200:
                    raise JudgeError(f"the judge at {self.url} answered HTTP {answer.status_code}")
                return self._read(answer)
        except httpx.HTTPError as e:
            # the kind of failure only: an exception's text can quote what the server sent
            raise JudgeError(f"the judge at {self.url} could not be reached: {type(e).__name__}") from e

    def _read(self, answer: httpx.Response) -> bytes:
        content = bytearray()
        for chunk in answer.iter_bytes():
            content += chunk
            if len(content) > MAX_ANSWER_BYTES:
                raise JudgeError(f"the judge at {self.url} answered more than {MAX_ANSWER_BYTES} bytes")
        return bytes(content)

    def _reply(self, content: bytes) -> str:
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            reply = parse_json(content)["choices"][0]["message"]["content"] or ""
            if isinstance(reply, str):
                return reply
        raise JudgeError(f"the judge at {self.url} did not answer with a chat completion")
