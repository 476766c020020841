"""Rating instruction responses with any OpenAI-compatible chat endpoint (the book's LLM-as-judge)."""

import httpx

from model.evaluation import judge_prompt, parse_judge_score

REPLY_TOKENS = 32  # "85" is the answer asked for; chatty judges get room for a short sentence around it


class JudgeError(RuntimeError):
    """The judge could not be asked: unreachable, refused, or an answer that is not a chat completion."""


class Judge:
    def __init__(self, url: str, model: str, api_key: str | None, timeout_s: float):
        self.url, self.model = url.rstrip("/"), model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.client.close()

    def rate(self, record: dict, response: str) -> tuple[int | None, str]:
        """(score 0-100 or None when the reply holds none, the judge's reply)."""
        body = {"model": self.model, "messages": [{"role": "user", "content": judge_prompt(record, response)}],
                "temperature": 0, "seed": 123, "max_tokens": REPLY_TOKENS}
        try:
            answer = self.client.post(f"{self.url}/chat/completions", json=body)
        except httpx.HTTPError as e:
            raise JudgeError(f"the judge at {self.url} could not be reached: {type(e).__name__}: {e}") from e
        if answer.status_code != 200:
            raise JudgeError(f"the judge at {self.url} answered HTTP {answer.status_code}: {answer.text[:300]}")
        try:
            reply = answer.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise JudgeError(f"the judge at {self.url} did not answer with a chat completion: "
                             f"{answer.text[:300]}") from e
        return parse_judge_score(reply), reply
