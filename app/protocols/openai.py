"""OpenAI's shapes, as vLLM serves them: completions and chat completions, their streamed chunks and
usage, the model list, and errors `{"error": {message, type, param, code}}` (400 for a request it refuses).

The chat template of an instruction-finetuned checkpoint is the prompt format it was trained with.
"""

import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import APIError
from app.protocols.failures import failure_of, first_problem
from core.enums import CheckpointTask
from model import NEXT_SECTION, PROMPT_FORMAT, SamplingParams, format_chat
from model.json_text import parse_json
from serving.client import MAX_STOP_CHARS, EngineClient, Generation, Model, PromptTooLong, pick_seed
from serving.deployments import NotServing, Served

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
MAX_STOP_SEQUENCES = 4
ERROR_TYPES = {"not_found": "not_found", "unavailable": "unavailable", "validation": "invalid_request",
               "overloaded": "rate_limited", "generation": "generation_error"}


def error_of(error: Exception, param: str | None = None) -> APIError:
    failure = failure_of(error)
    if failure is None:
        raise error
    return APIError(failure.status or 400, failure.message, param=param, type_=ERROR_TYPES[failure.kind])


class StreamOptions(BaseModel):
    include_usage: bool = False


StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, logit_bias, ...)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: StopString | list[StopString] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p if self.top_p < 1 else None,
                              repetition_penalty=1.0 + max(0.0, self.frequency_penalty))

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"stop may hold at most {MAX_STOP_SEQUENCES} sequences", param="stop")
        return tuple(stops)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


async def parse(request: Request, schema: type[Sampling]) -> Sampling:
    try:
        return schema.model_validate(parse_json(await request.body()))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the body is not valid JSON") from None
    except ValidationError as e:
        param, message = first_problem(e)
        raise APIError(400, message, param=param) from None


def serving(engines: EngineClient, name: str | None) -> Model:
    try:
        return engines.serving(name, CheckpointTask.LM)
    except NotServing as e:
        error = error_of(e, param=None if e.reason == NotServing.Reason.LOADING else "model")
        if e.reason == NotServing.Reason.MISSING:
            error.message = f"the model {name!r} does not exist"  # OpenAI's words
        raise error from None


def chat_prompt(messages: list[Message], model: Model) -> str:
    if model.loaded.prompt_format != PROMPT_FORMAT:
        raise APIError(400, f"model {model.name} has no chat template: it was not instruction-finetuned (use "
                            f"/v1/completions)", param="model")
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    return format_chat([(m.role, m.content) for m in messages])


async def admit(engines: EngineClient, body: Sampling, model: Model, prompt_text: str, max_tokens: int | None,
                extra_stop: tuple[str, ...] = ()) -> Generation:
    """The request's n choices, admitted to the engine together (or not at all)."""
    try:
        prompt = await engines.encode(model, prompt_text)
        engines.check_fits(model, prompt)
    except PromptTooLong as e:
        raise APIError(400, f"the prompt holds {e.n_tokens} tokens; this model's context is {e.context_length}",
                       param="prompt", code="context_length_exceeded") from None
    except Exception as e:
        raise error_of(e, param="prompt") from None
    stops = body.stops() + extra_stop
    try:
        return engines.generate(model, prompt, max_tokens, body.sampling_params(), stops, pick_seed(body.seed),
                                n=body.n)
    except Exception as e:
        raise error_of(e) from None


async def completion(engines: EngineClient, body: CompletionRequest) -> tuple[Generation, str]:
    model = serving(engines, body.model)
    return await admit(engines, body, model, body.prompt, body.max_tokens), model.name


async def chat_completion(engines: EngineClient, body: ChatRequest) -> tuple[Generation, str]:
    model = serving(engines, body.model)
    prompt = chat_prompt(body.messages, model)
    # the model goes on to a next section: the answer is over
    generation = await admit(engines, body, model, prompt, body.max_completion_tokens or body.max_tokens,
                             (NEXT_SECTION,))
    return generation, model.name


def usage(generation: Generation) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


class Answer:
    """The chunks or the whole answer of an admitted request."""

    def __init__(self, generation: Generation, body: Sampling, model: str, chat: bool):
        self.generation, self.body, self.chat = generation, body, chat
        self.head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}

    async def whole(self) -> dict:
        n = self.body.n
        texts, reasons = [""] * n, [None] * n
        try:
            async for index, event in self.generation.events():
                texts[index] += event.text
                reasons[index] = event.finish_reason and FINISH[event.finish_reason]
        except Exception as e:
            raise error_of(e) from None
        choices = [({"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r} if self.chat
                    else {"index": i, "text": t, "logprobs": None, "finish_reason": r})
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": kind, "choices": choices, "usage": usage(self.generation)}

    def _chunk(self, choices: list, **extra) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps({**self.head, 'object': kind, 'choices': choices, **extra})}\n\n"

    async def chunks(self):
        try:
            if self.chat:
                yield self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                                   for i in range(self.body.n)])
            async for index, event in self.generation.events():
                reason = event.finish_reason and FINISH[event.finish_reason]
                if self.chat:
                    yield self._chunk([{"index": index, "delta": {"content": event.text} if event.text else {},
                                        "finish_reason": reason}])
                else:
                    yield self._chunk([{"index": index, "text": event.text, "logprobs": None, "finish_reason": reason}])
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk([], usage=usage(self.generation))
            yield "data: [DONE]\n\n"
        except Exception as e:
            error = error_of(e)
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type}})}\n\n"


def models(served: list[Served]) -> dict:
    return {"object": "list", "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "scratchllm",
                                        "root": s.checkpoint_id} for s in served]}
