"""OpenAI-compatible inference: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

The chat template of an instruction-finetuned checkpoint is the Alpaca prompt it was trained with. Errors
are OpenAI's `{"error": {message, type, param, code}}`; validation errors are 400, as vLLM answers them.
"""

import asyncio
import json
import secrets
import time
import uuid
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.auth import Reader
from app.errors import APIError
from app.serving import NotServing
from app.streams import EngineStream, GenerationFailed, Overloaded
from model import SamplingParams, format_prompt

router = APIRouter(prefix="/v1", tags=["inference (OpenAI)"], dependencies=[Reader])
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
CHAT_STOP = "\n\n### "  # the next Alpaca section: the answer is over


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients send fields we have no use for (user, logit_bias, ...)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2)


class CompletionRequest(Sampling):
    prompt: str = Field(min_length=1)
    max_tokens: int | None = Field(16, ge=1)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


def _served(request: Request, name: str | None):
    try:
        return request.app.state.deployments.serving(name, "lm")
    except NotServing as e:
        if e.reason == "missing":
            message = f"the model {name!r} does not exist" if name else e.message
            raise APIError(404, message, param="model", type_="not_found") from None
        if e.reason == "loading":
            raise APIError(503, e.message, type_="unavailable") from None
        raise APIError(400, e.message, param="model") from None


async def _parse(request: Request, schema):
    try:
        return schema.model_validate(await request.json())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "the body is not valid JSON") from None
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def _chat_prompt(messages: list[Message], prompt_format: str | None, name: str) -> str:
    """The Alpaca prompt of the conversation: earlier turns as answered instructions, the last user
    message as the instruction to answer now; a system message goes first."""
    if prompt_format != "alpaca":
        raise APIError(400, f"model {name} has no chat template: it was not instruction-finetuned (use "
                            f"/v1/completions)", param="model")
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    system = "".join(m.content + "\n\n" for m in messages if m.role == "system")
    turns, pending = [], None
    for message in messages:
        if message.role == "user":
            pending = message.content
        elif message.role == "assistant" and pending is not None:
            turns.append(format_prompt({"instruction": pending, "input": ""}) + f"\n\n### Response:\n"
                         f"{message.content}\n\n")
            pending = None
    return system + "".join(turns) + format_prompt({"instruction": pending, "input": ""}) + "\n\n### Response:\n"


class Generation:
    """The n choices of one request, admitted to the engine together (or not at all)."""

    def __init__(self, request: Request, body: Sampling, prompt_text: str, max_tokens: int | None,
                 extra_stop: tuple[str, ...] = ()):
        self.served = _served(request, body.model)
        loaded = self.served.current
        self.timeout_s = request.app.state.settings.generation_timeout_s
        prompt = loaded.tokenizer.encode(prompt_text, allow_special=False)
        context = loaded.engine.model.config.context_length
        if len(prompt) >= context:
            raise APIError(400, f"the prompt holds {len(prompt)} tokens; this model's context is {context}",
                           param="prompt", code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop may hold at most 4 sequences", param="stop")
        params = SamplingParams(temperature=body.temperature, top_p=body.top_p if body.top_p < 1 else None,
                                repetition_penalty=1.0 + max(0.0, body.frequency_penalty))
        seed = body.seed if body.seed is not None else secrets.randbits(32)
        self.prompt_tokens = len(prompt)
        self.streams: list[EngineStream] = []
        try:
            for i in range(body.n):
                self.streams.append(EngineStream(loaded.engine, prompt, max_tokens or context - len(prompt),
                                                 params, tuple(stops) + extra_stop, seed + i,
                                                 loaded.tokenizer.eot_id, request.app.state.metrics,
                                                 self.served.name))
        except Overloaded as e:
            self.abort()
            raise APIError(429, f"the model is overloaded: {e}", type_="rate_limited") from None
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), self.served.name
        self.completion_tokens = 0

    def abort(self) -> None:
        for stream in self.streams:
            stream.abort()

    async def events(self):
        """(choice index, event) as they come, every choice to its end."""
        pending = {asyncio.ensure_future(s.next_event(self.timeout_s)): i for i, s in enumerate(self.streams)}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                event = future.result()
                self.completion_tokens += 1
                yield index, event
                if event.finish_reason is None:
                    pending[asyncio.ensure_future(self.streams[index].next_event(self.timeout_s))] = index

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


async def _answer(generation: Generation, body: Sampling, chat: bool):
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": generation.id, "created": generation.created, "model": generation.model}

    if not body.stream:
        texts, reasons = [""] * body.n, [None] * body.n
        try:
            async for index, event in generation.events():
                texts[index] += event.text
                reasons[index] = event.finish_reason and FINISH[event.finish_reason]
        except GenerationFailed as e:
            raise APIError(500, str(e), type_="generation_error") from None
        finally:
            generation.abort()
        choices = [({"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r} if chat else
                    {"index": i, "text": t, "logprobs": None, "finish_reason": r})
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return JSONResponse({**head, "object": kind, "choices": choices, "usage": generation.usage()})

    chunk_kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, **extra) -> str:
        return f"data: {json.dumps({**head, 'object': chunk_kind, 'choices': choices, **extra})}\n\n"

    async def stream():
        try:
            if chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(body.n)])
            async for index, event in generation.events():
                reason = event.finish_reason and FINISH[event.finish_reason]
                if chat:
                    yield chunk([{"index": index, "delta": {"content": event.text} if event.text else {},
                                  "finish_reason": reason}])
                else:
                    yield chunk([{"index": index, "text": event.text, "logprobs": None, "finish_reason": reason}])
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], usage=generation.usage())
            yield "data: [DONE]\n\n"
        except GenerationFailed as e:
            yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'generation_error'}})}\n\n"
        finally:
            generation.abort()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models")
def list_models(request: Request) -> dict:
    manager = request.app.state.deployments
    with manager.lock:
        served = list(manager.served.values())
    return {"object": "list", "data": [{"id": s.name, "object": "model", "created": 0, "owned_by": "scratchllm",
                                        "root": s.checkpoint_id} for s in served]}


@router.post("/completions")
async def completions(request: Request):
    body = await _parse(request, CompletionRequest)
    return await _answer(Generation(request, body, body.prompt, body.max_tokens), body, chat=False)


@router.post("/chat/completions")
async def chat_completions(request: Request):
    body = await _parse(request, ChatRequest)
    served = _served(request, body.model)
    prompt = _chat_prompt(body.messages, served.current.prompt_format, served.name)
    max_tokens = body.max_completion_tokens or body.max_tokens
    return await _answer(Generation(request, body, prompt, max_tokens, (CHAT_STOP,)), body, chat=True)
