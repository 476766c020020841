"""Text generation in the shapes of Hugging Face text-generation-inference (TGI).

`POST /generate`, `POST /generate_stream` (server-sent events), `POST /` (either, by `stream`), `GET /info`;
under `/d/{deployment}/...` for a named deployment, at the root for the default one. A request is validated
and admitted to the engine before any byte of the answer is sent: a bad or unlucky request never starts a
stream. Errors are TGI's `{error, error_type}`.
"""

import json
import secrets
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.auth import Reader
from app.serving import NotServing
from app.streams import EngineStream, GenerationFailed, Overloaded
from model import SamplingParams, StreamEvent

router = APIRouter(tags=["generation (TGI)"], dependencies=[Reader])
FINISH_REASONS = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
RETRY_AFTER_S = 1


class TGIError(Exception):
    def __init__(self, status: int, message: str, error_type: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, "error_type": self.error_type}, self.status, headers=self.headers)


class Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore")  # TGI clients send fields we have no use for (watermark, ...)

    max_new_tokens: int = Field(100, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = Field(None, ge=0, lt=2**63)
    details: bool = False
    return_full_text: bool = False
    truncate: int | None = Field(None, ge=1)


class GenerateRequest(BaseModel):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


def _validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


async def _parse(request: Request) -> GenerateRequest:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TGIError(422, "the body is not valid JSON", "validation") from None
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as e:
        raise TGIError(422, _validation_message(e), "validation") from None


def _loaded(request: Request, deployment: str | None):
    try:
        return request.app.state.deployments.serving(deployment, "lm")
    except NotServing as e:
        status = {"missing": 404 if deployment else 503, "loading": 503, "wrong_task": 422}[e.reason]
        kind = {"missing": "not_found" if deployment else "unavailable", "loading": "unavailable",
                "wrong_task": "validation"}[e.reason]
        raise TGIError(status, e.message, kind) from None


class Admitted:
    """A request admitted to an engine, with its events arriving on this event loop."""

    def __init__(self, body: GenerateRequest, served, metrics):
        loaded = served.current
        self.engine, self.tokenizer, self.body = loaded.engine, loaded.tokenizer, body
        p = body.parameters
        sampling = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
        self.seed = (p.seed if p.seed is not None else secrets.randbits(32)) if sampling else None
        params = SamplingParams(temperature=(p.temperature or 1.0) if sampling else 0.0,
                                top_k=p.top_k if sampling else None, top_p=p.top_p if sampling else None,
                                repetition_penalty=p.repetition_penalty or 1.0)
        prompt = self.tokenizer.encode(body.inputs, allow_special=False)
        context = self.engine.model.config.context_length
        if p.truncate is not None:
            prompt = prompt[-p.truncate:]
        if len(prompt) >= context:
            raise TGIError(422, f"inputs hold {len(prompt)} tokens; this model's context is {context} (pass "
                                f"`truncate` to keep only the last tokens)", "validation")
        try:
            self.stream = EngineStream(self.engine, prompt, p.max_new_tokens, params, tuple(p.stop), self.seed,
                                       self.tokenizer.eot_id, metrics, served.name)
        except Overloaded as e:
            raise TGIError(429, f"the model is overloaded: {e}", "overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    async def next_event(self, timeout_s: float) -> StreamEvent:
        try:
            return await self.stream.next_event(timeout_s)
        except GenerationFailed as e:
            raise TGIError(424, str(e), "generation") from None

    def abort(self) -> None:
        self.stream.abort()

    def details(self, event: StreamEvent, n_tokens: int) -> dict[str, Any]:
        return {"finish_reason": FINISH_REASONS[event.finish_reason], "generated_tokens": n_tokens,
                "seed": self.seed}

    def token(self, event: StreamEvent, text: str) -> dict[str, Any]:
        return {"id": event.token_id, "text": text, "logprob": event.logprob,
                "special": event.token_id == self.tokenizer.eot_id}

    def final_text(self, text: str) -> str:
        return self.body.inputs + text if self.body.parameters.return_full_text else text


async def _generate(request: Request, deployment: str | None, as_list: bool = False) -> JSONResponse:
    body = await _parse(request)
    admitted = Admitted(body, _loaded(request, deployment), request.app.state.metrics)
    timeout_s = request.app.state.settings.generation_timeout_s
    events = []
    try:
        while not events or events[-1].finish_reason is None:
            events.append(await admitted.next_event(timeout_s))
    finally:
        admitted.abort()  # a no-op once finished; stops the sequence if this request was cancelled
    answer: dict[str, Any] = {"generated_text": admitted.final_text("".join(e.text for e in events))}
    if body.parameters.details:
        tokens = [admitted.token(e, admitted.tokenizer.decode([e.token_id])) for e in events]
        answer["details"] = {**admitted.details(events[-1], len(events)), "prefill": [], "tokens": tokens}
    return JSONResponse([answer] if as_list else answer)


async def _generate_stream(request: Request, deployment: str | None) -> StreamingResponse:
    body = await _parse(request)
    admitted = Admitted(body, _loaded(request, deployment), request.app.state.metrics)
    timeout_s = request.app.state.settings.generation_timeout_s

    async def events():
        texts = []
        try:
            for index in range(1, 1 << 30):
                try:
                    event = await admitted.next_event(timeout_s)
                except TGIError as e:
                    yield f"data:{json.dumps({'error': e.message, 'error_type': e.error_type})}\n\n"
                    return
                texts.append(event.text)
                last = event.finish_reason is not None
                message = {"index": index, "token": admitted.token(event, event.text),
                           "generated_text": admitted.final_text("".join(texts)) if last else None,
                           "details": admitted.details(event, index) if last else None}
                yield f"data:{json.dumps(message)}\n\n"
                if last:
                    return
        finally:
            admitted.abort()  # the client went away (or the stream ended): free the slot

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _tgi(call, request: Request, deployment: str | None):
    try:
        return await call(request, deployment)
    except TGIError as e:
        return e.response()


@router.post("/generate")
async def generate(request: Request, deployment: str | None = None):
    return await _tgi(_generate, request, deployment)


@router.post("/generate_stream")
async def generate_stream(request: Request, deployment: str | None = None):
    return await _tgi(_generate_stream, request, deployment)


@router.post("/")
async def generate_either(request: Request, deployment: str | None = None):
    """TGI's compatibility route: `stream` in the body chooses; the non-streaming answer is a list."""
    async def either(request: Request, deployment: str | None):
        if (await _parse(request)).stream:
            return await _generate_stream(request, deployment)
        return await _generate(request, deployment, as_list=True)

    return await _tgi(either, request, deployment)


@router.get("/info")
async def info(request: Request, deployment: str | None = None):
    try:
        served = _loaded(request, deployment)
    except TGIError as e:
        return e.response()
    config = served.current.engine.model.config
    return {"model_id": served.name, "model_sha": served.current.checkpoint_id, "model_dtype": "float32",
            "model_device_type": str(served.current.engine.decoder.cache.k.device.type),
            "max_input_tokens": config.context_length - 1, "max_total_tokens": config.context_length,
            "max_concurrent_requests": served.current.engine.max_batch + served.current.engine.max_queue,
            "max_best_of": 1, "max_stop_sequences": 16, "router": "scratchllm", "version": "0.1.0",
            "validation_workers": 1, "max_client_batch_size": 1}
