"""Hugging Face text-generation-inference's shapes: its request, its sampling parameters, its token events
and answers, and its errors `{error, error_type}` (422 for a request it refuses)."""

import json
from typing import Annotated, Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import RETRY_AFTER_S
from app.protocols.failures import failure_of, first_problem
from core.enums import CheckpointTask
from model import SamplingParams, StreamEvent
from model.json_text import parse_json
from serving.client import MAX_STOP_CHARS, EngineClient, Generation, Model, PromptTooLong, pick_seed

FINISH_REASONS = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
MAX_STOP_SEQUENCES = 16


class TGIError(Exception):
    def __init__(self, status: int, message: str, error_type: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}

    @classmethod
    def of(cls, error: Exception) -> "TGIError":
        failure = failure_of(error)
        if failure is None:
            raise error
        headers = {"Retry-After": str(RETRY_AFTER_S)} if failure.status == 429 else None
        return cls(failure.status or 422, failure.message, failure.kind, headers)


class Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore")  # TGI clients send fields we have no use for (watermark, ...)

    max_new_tokens: int = Field(100, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] = Field(default_factory=list,
                                                                         max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=0, lt=2**63)
    details: bool = False
    return_full_text: bool = False
    truncate: int | None = Field(None, ge=1)

    @property
    def sampling(self) -> bool:
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))

    def sampling_params(self) -> SamplingParams:
        sampling = self.sampling
        return SamplingParams(temperature=(self.temperature or 1.0) if sampling else 0.0,
                              top_k=self.top_k if sampling else None, top_p=self.top_p if sampling else None,
                              repetition_penalty=self.repetition_penalty or 1.0)


class GenerateRequest(BaseModel):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


async def parse(request: Request) -> GenerateRequest:
    try:
        body = parse_json(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TGIError(422, "the body is not valid JSON", "validation") from None
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as e:
        raise TGIError(422, first_problem(e)[1], "validation") from None


def serving(engines: EngineClient, deployment: str | None) -> Model:
    try:
        return engines.serving(deployment, CheckpointTask.LM)
    except Exception as e:
        raise TGIError.of(e) from None


class Answer:
    """One admitted TGI request: its events as TGI's tokens, details and texts."""

    def __init__(self, body: GenerateRequest, model: Model, generation: Generation, seed: int | None):
        self.body, self.tokenizer, self.generation, self.seed = body, model.loaded.tokenizer, generation, seed

    def details(self, event: StreamEvent, n_tokens: int) -> dict[str, Any]:
        return {"finish_reason": FINISH_REASONS[event.finish_reason], "generated_tokens": n_tokens,
                "seed": self.seed}

    def token(self, event: StreamEvent, text: str) -> dict[str, Any]:
        return {"id": event.token_id, "text": text, "logprob": event.logprob,
                "special": event.token_id == self.tokenizer.eot_id}

    def final_text(self, text: str) -> str:
        return self.body.inputs + text if self.body.parameters.return_full_text else text

    def answer(self, events: list[StreamEvent]) -> dict[str, Any]:
        """The non-streaming answer of the whole sequence."""
        answer: dict[str, Any] = {"generated_text": self.final_text("".join(e.text for e in events))}
        if self.body.parameters.details:
            tokens = [self.token(e, self.tokenizer.decode([e.token_id])) for e in events]
            answer["details"] = {**self.details(events[-1], len(events)), "prefill": [], "tokens": tokens}
        return answer

    def stream_message(self, index: int, event: StreamEvent, texts: list[str]) -> dict[str, Any]:
        last = event.finish_reason is not None
        return {"index": index, "token": self.token(event, event.text),
                "generated_text": self.final_text("".join(texts)) if last else None,
                "details": self.details(event, index) if last else None}


async def admit(engines: EngineClient, body: GenerateRequest, deployment: str | None) -> Answer:
    """Validate the request against its deployment and admit it, before any byte of the answer is sent."""
    model = serving(engines, deployment)
    p = body.parameters
    seed = pick_seed(p.seed) if p.sampling else None
    try:
        prompt = await engines.encode(model, body.inputs)
        if p.truncate is not None:
            prompt = prompt[-p.truncate:]
        generation = engines.generate(model, prompt, p.max_new_tokens, p.sampling_params(), tuple(p.stop), seed)
    except PromptTooLong as e:
        raise TGIError(422, f"inputs hold {e.n_tokens} tokens; this model's context is {e.context_length} (pass "
                            f"`truncate` to keep only the last tokens)", "validation") from None
    except Exception as e:
        raise TGIError.of(e) from None
    return Answer(body, model, generation, seed)


def info(model: Model) -> dict[str, Any]:
    engine = model.loaded.engine
    return {"model_id": model.name, "model_sha": model.loaded.checkpoint_id,
            "model_dtype": str(engine.dtype).removeprefix("torch."), "model_device_type": engine.device.type,
            "max_input_tokens": engine.context_length - 1, "max_total_tokens": engine.context_length,
            "max_concurrent_requests": engine.capacity, "max_best_of": 1, "max_stop_sequences": MAX_STOP_SEQUENCES,
            "router": "scratchllm", "version": "0.1.0", "validation_workers": 1, "max_client_batch_size": 1}
