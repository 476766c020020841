"""Hugging Face text-generation-inference's shapes: its request, its sampling parameters, its token events
and answers, and its errors `{error, error_type}` (422 for a request it refuses)."""

import json
from typing import Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import RETRY_AFTER_S
from app.protocols.failures import failure_of, first_problem
from app.protocols.unsupported import refused_field
from app.schemas.common import StopString
from core.enums import CheckpointTask
from model import SamplingParams, StreamEvent
from model.json_text import parse_json
from serving.client import Asked, EngineClient, Generation, Model, PromptTooLong, pick_seed
from serving.grammar import json_schema_source

FINISH_REASONS = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
MAX_STOP_SEQUENCES = 16
MAX_TOP_N_TOKENS = 20
MAX_BEST_OF = 8
# TGI's parameters this server does not implement, with the values that mean "not used" (what clients send)
INERT = {"watermark": (False,)}


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


class GrammarSpec(BaseModel):
    type: Literal["json", "regex"]
    value: dict[str, Any] | str = Field(description="json: a JSON Schema (an object, or its text); regex: a pattern")

    def source(self) -> tuple[str, str]:
        """(the grammar's kind, its source) for the engine client."""
        if self.type == "regex":
            if not isinstance(self.value, str):
                raise TGIError(422, "a regex grammar's value is the pattern, a string", "validation")
            return "regex", self.value
        schema = self.value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError:
                schema = None
        if not isinstance(schema, dict):
            raise TGIError(422, "a json grammar's value is a JSON Schema: an object, or its text", "validation")
        return "json_schema", json_schema_source(schema)


class Parameters(BaseModel):
    model_config = ConfigDict(extra="allow")  # then refused unless inert: see _nothing_unimplemented

    max_new_tokens: int = Field(100, ge=1)
    do_sample: bool = False
    temperature: float | None = Field(None, gt=0)
    top_k: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI's, additive")
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = Field(None, ge=0, lt=2**63)
    details: bool = False
    decoder_input_details: bool = Field(False, description="the prompt's tokens and logprobs in details.prefill")
    top_n_tokens: int | None = Field(None, ge=0, le=MAX_TOP_N_TOKENS)
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF, description="sample this many; answer the likeliest")
    grammar: GrammarSpec | None = Field(None, description="the output follows it (constrained decoding)")
    return_full_text: bool = False
    truncate: int | None = Field(None, ge=1)
    adapter_id: str | None = Field(None, max_length=100, description=(
        "one of the deployment's LoRA adapters (TGI's multi-LoRA); the same as the deployment `<name>:<adapter>`"))

    @model_validator(mode="after")
    def _nothing_unimplemented(self):
        refused = refused_field(self.model_extra or {}, INERT)
        if refused is not None:
            raise ValueError(f"{refused}: not supported by this server with the value sent")
        if (self.best_of or 1) > 1 and not self.sampling:
            raise ValueError("best_of > 1 needs sampling (do_sample, temperature, top_k or top_p)")
        return self

    @property
    def sampling(self) -> bool:
        return self.do_sample or any(v is not None for v in (self.temperature, self.top_k, self.top_p))

    def sampling_params(self) -> SamplingParams:
        sampling = self.sampling
        return SamplingParams(temperature=(self.temperature or 1.0) if sampling else 0.0,
                              top_k=self.top_k if sampling else None, top_p=self.top_p if sampling else None,
                              repetition_penalty=self.repetition_penalty or 1.0,
                              frequency_penalty=self.frequency_penalty or 0.0)


class GenerateRequest(BaseModel):
    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


def _refuse_for_streams(body: GenerateRequest) -> None:
    if (body.parameters.best_of or 1) > 1:
        raise TGIError(422, "best_of > 1 cannot be streamed: the best is known only at the end", "validation")


async def parse(request: Request) -> GenerateRequest:
    try:
        body = parse_json(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise TGIError(422, "the body is not valid JSON", "validation") from None
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as e:
        raise TGIError(422, first_problem(e)[1], "validation") from None


def serving(engines: EngineClient, deployment: str | None, adapter_id: str | None = None) -> Model:
    """The deployment's model (None: the default deployment's), or its adapter adapter_id's."""
    try:
        model = engines.serving(deployment, CheckpointTask.LM)
        if adapter_id is None:
            return model
        if model.adapter is not None:
            raise TGIError(422, f"{model.id} is an adapter already: adapter_id is for a deployment's base model",
                           "validation")
        return engines.serving(f"{model.name}:{adapter_id}", CheckpointTask.LM)
    except TGIError:
        raise
    except Exception as e:
        raise TGIError.of(e) from None


class Answer:
    """One admitted TGI request: its events as TGI's tokens, details and texts."""

    def __init__(self, body: GenerateRequest, model: Model, generation: Generation, seed: int | None):
        self.body, self.tokenizer, self.generation, self.seed = body, model.loaded.tokenizer, generation, seed

    def details(self, event: StreamEvent, n_tokens: int) -> dict[str, Any]:
        return {"finish_reason": FINISH_REASONS[event.finish_reason], "generated_tokens": n_tokens,
                "seed": self.seed}

    def token(self, token_id: int, text: str, logprob: float | None) -> dict[str, Any]:
        return {"id": token_id, "text": text, "logprob": logprob, "special": token_id == self.tokenizer.eot_id}

    def top_tokens(self, event: StreamEvent) -> list[dict[str, Any]]:
        return [self.token(t, self.tokenizer.decode([t]), lp) for t, lp in event.top_logprobs or []]

    def final_text(self, text: str) -> str:
        return self.body.inputs + text if self.body.parameters.return_full_text else text

    def sequence(self, index: int, events: list[StreamEvent]) -> dict[str, Any]:
        """The index-th sequence's text and details, as TGI's answer and its best_of_sequences word them."""
        p = self.body.parameters
        prefill = [self.token(s.token_id, self.tokenizer.decode([s.token_id]), s.logprob)
                   for s in self.generation.request(index).prompt_scores] if p.decoder_input_details else []
        details = {**self.details(events[-1], len(events)), "prefill": prefill,
                   "tokens": [self.token(e.token_id, self.tokenizer.decode([e.token_id]), e.logprob) for e in events]}
        if p.top_n_tokens is not None:
            details["top_tokens"] = [self.top_tokens(e) for e in events]
        return {"generated_text": self.final_text("".join(e.text for e in events)), "details": details}

    def answer(self, sequences: list[list[StreamEvent]]) -> dict[str, Any]:
        """The non-streaming answer: the likeliest sequence, and with details the others sampled (best_of)."""
        likeliest = sorted(range(len(sequences)), key=lambda i: -sum(e.logprob for e in sequences[i]))
        best, *others = [self.sequence(i, sequences[i]) for i in likeliest]
        if not self.body.parameters.details:
            return {"generated_text": best["generated_text"]}
        if others:
            best["details"]["best_of_sequences"] = [{**o["details"], "generated_text": o["generated_text"]}
                                                    for o in others]
        return best

    def stream_message(self, index: int, event: StreamEvent, texts: list[str]) -> dict[str, Any]:
        last = event.finish_reason is not None
        message = {"index": index, "token": self.token(event.token_id, event.text, event.logprob),
                   "generated_text": self.final_text("".join(texts)) if last else None,
                   "details": self.details(event, index) if last else None}
        if self.body.parameters.top_n_tokens is not None:
            message["top_tokens"] = self.top_tokens(event)
        return message


async def admit(engines: EngineClient, body: GenerateRequest, deployment: str | None, stream: bool) -> Answer:
    """Validate the request against its deployment and admit it, before any byte of the answer is sent."""
    if stream:
        _refuse_for_streams(body)
    p = body.parameters
    model = serving(engines, deployment, p.adapter_id)
    seed = pick_seed(p.seed) if p.sampling else None
    try:
        grammar = None if p.grammar is None else await engines.grammar(model, *p.grammar.source())
        asked = Asked(p.max_new_tokens, p.sampling_params(), tuple(p.stop), seed=seed, n=p.best_of or 1,
                      logprobs=p.top_n_tokens, prompt_logprobs=0 if p.decoder_input_details and p.details else None,
                      grammar=grammar)
        prompt = await engines.encode(model, body.inputs)
        if p.truncate is not None:
            prompt = prompt[-p.truncate:]
        generation = engines.generate(model, [prompt], asked)
    except PromptTooLong as e:
        raise TGIError(422, f"inputs hold {e.n_tokens} tokens; this model's context is {e.context_length} (pass "
                            f"`truncate` to keep only the last tokens)", "validation") from None
    except Exception as e:
        raise TGIError.of(e) from None
    return Answer(body, model, generation, seed)


def info(model: Model) -> dict[str, Any]:
    engine = model.loaded.engine
    return {"model_id": model.id, "model_sha": model.checkpoint_id,
            "model_dtype": str(engine.dtype).removeprefix("torch."), "model_device_type": engine.device.type,
            "max_input_tokens": engine.context_length - 1, "max_total_tokens": engine.context_length,
            "max_concurrent_requests": engine.capacity, "max_best_of": MAX_BEST_OF,
            "max_stop_sequences": MAX_STOP_SEQUENCES, "max_top_n_tokens": MAX_TOP_N_TOKENS,
            "router": "scratchllm", "version": "0.1.0", "validation_workers": 1, "max_client_batch_size": 1}
