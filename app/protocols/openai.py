"""OpenAI's shapes, as vLLM serves them: completions (prompts as text or token ids, several at once, `echo`,
`logprobs`, `best_of`) and chat completions (`logprobs`, `top_logprobs`), their streamed chunks and usage, the
model list, and errors `{"error": {message, type, param, code}}` (400 for a request it refuses).

Sampling follows OpenAI (additive frequency and presence penalties, logit_bias, seed) with vLLM's extra
parameters (top_k, min_p, repetition_penalty, stop_token_ids, ignore_eos). A field this server does not
implement is refused by name when its value would change the answer (app/protocols/unsupported.py).
Logprobs are the model's own (before penalties, temperature and filters), as vLLM reports them by default.
The chat template of an instruction-finetuned checkpoint is the prompt format it was trained with.
"""

import codecs
import json
import time
import uuid
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from app.errors import APIError
from app.protocols.failures import failure_of, first_problem
from app.protocols.unsupported import ANY, refused_field
from app.schemas.common import StopString
from core.enums import CheckpointTask
from model import NEXT_SECTION, PROMPT_FORMAT, SamplingParams, StreamEvent, format_chat
from model.json_text import parse_json
from serving.client import (
    Asked,
    EngineClient,
    Generation,
    InvalidRequest,
    Model,
    PromptTooLong,
    pick_seed,
)
from serving.deployments import NotServing, Served
from serving.grammar import Grammar, json_schema_source

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
MAX_STOP_SEQUENCES = 4
MAX_LOGPROBS = 20  # vLLM's default limit; OpenAI's is 5 for completions and 20 for chat
MAX_PROMPTS = 64  # prompts in one completions request
ERROR_TYPES = {"not_found": "not_found", "unavailable": "unavailable", "validation": "invalid_request",
               "overloaded": "rate_limited", "generation": "generation_error"}
# fields outside the schemas: those that cannot change the answer, and the values of the others that mean
# "not used"; any other value of them, or any other field, is refused by name
INERT = {
    "user": ANY, "metadata": ANY, "store": ANY, "service_tier": ANY, "prompt_cache_key": ANY,
    "safety_identifier": ANY, "parallel_tool_calls": ANY,
    "add_special_tokens": ANY,  # GPT-2's tokenizer adds none either way
    "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
    "function_call": ("none", "auto"), "modalities": (["text"],), "suffix": ("",), "use_beam_search": (False,),
    "length_penalty": (1.0,), "include_stop_str_in_output": (False,), "skip_special_tokens": (True,),
    "spaces_between_special_tokens": (True,), "min_tokens": (0,), "add_generation_prompt": (True,),
    "continue_final_message": (False,), "echo": (False,), "best_of": (1,),
}


def error_of(error: Exception, param: str | None = None) -> APIError:
    failure = failure_of(error)
    if failure is None:
        raise error
    return APIError(failure.status or 400, failure.message, param=param, type_=ERROR_TYPES[failure.kind])


class StreamOptions(BaseModel):
    include_usage: bool = False


TokenId = Annotated[int, Field(ge=0)]


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(max_length=64)
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema", description="the JSON Schema every answer validates against")
    strict: bool | None = Field(None, description="answers always follow the schema, strict or not")


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema goes with type json_schema, and only with it")
        return self


class Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # then refused unless inert: see _nothing_unimplemented

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
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=1024, description="token id (as a string) -> a bias added to its logit")
    # vLLM's extra parameters
    top_k: int | None = Field(None, ge=-1, description="-1 or 0: off")
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    stop_token_ids: list[TokenId] | None = Field(None, max_length=64)
    ignore_eos: bool = False
    response_format: ResponseFormat | None = Field(None, description=(
        "json_object: any JSON object; json_schema: JSON valid against the schema (by constrained decoding)"))

    @model_validator(mode="after")
    def _nothing_unimplemented(self):
        refused = refused_field(self.model_extra or {}, INERT)
        if refused is not None:
            raise ValueError(f"{refused}: not supported by this server with the value sent (its supported subset: "
                             "README, 'OpenAI compatibility')")
        return self

    def sampling_params(self) -> SamplingParams:
        bias = tuple((int(token), value) for token, value in (self.logit_bias or {}).items())
        return SamplingParams(temperature=self.temperature, top_p=self.top_p if self.top_p < 1 else None,
                              top_k=self.top_k if self.top_k and self.top_k > 0 else None, min_p=self.min_p or None,
                              repetition_penalty=self.repetition_penalty or 1.0,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              logit_bias=bias)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise APIError(400, f"stop may hold at most {MAX_STOP_SEQUENCES} sequences", param="stop")
        return tuple(stops)

    def check_token_ids(self, vocab_size: int) -> None:
        for token in self.logit_bias or {}:
            if not token.isdecimal() or int(token) >= vocab_size:
                raise APIError(400, f"logit_bias key {token!r} is not a token id of this model (0 to "
                                    f"{vocab_size - 1})", param="logit_bias")
        if any(token >= vocab_size for token in self.stop_token_ids or ()):
            raise APIError(400, f"stop_token_ids must be below {vocab_size}", param="stop_token_ids")

    def asked(self, max_tokens: int | None, extra_stop: tuple[str, ...] = (), grammar: Grammar | None = None) -> Asked:
        return Asked(max_tokens, self.sampling_params(), self.stops() + extra_stop,
                     tuple(self.stop_token_ids or ()), pick_seed(self.seed), self.n, ignore_eos=self.ignore_eos,
                     grammar=grammar)

    async def grammar(self, engines: EngineClient, model: Model) -> Grammar | None:
        """The grammar response_format asks the output to follow, compiled; None for plain text."""
        wanted = self.response_format
        if wanted is None or wanted.type == "text":
            return None
        if self.ignore_eos:
            raise APIError(400, "ignore_eos cannot go with a JSON response_format: the end of the JSON ends the "
                                "answer", param="ignore_eos")
        schema = wanted.json_schema.json_schema if wanted.json_schema else None
        try:
            return await engines.grammar(model, "json_schema", json_schema_source(schema))
        except InvalidRequest as e:
            raise APIError(400, f"response_format: {e}", param="response_format") from None


Prompt = Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(16, ge=0, description="0: only score the prompt (with echo and logprobs)")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=16)

    @model_validator(mode="after")
    def _best_of_n(self):
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError("best_of must be at least n")
        if self.best_of is not None and self.best_of > 1 and self.stream:
            raise ValueError("best_of cannot be streamed: the best are known only at the end")
        return self

    def prompts(self) -> list[str | list[int]]:
        single = isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int))
        return [self.prompt] if single else list(self.prompt)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


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
            error.message = f"the model {name!r} does not exist: {e.message}"  # OpenAI's words, then why
        raise error from None


def chat_prompt(messages: list[Message], model: Model) -> str:
    if model.prompt_format != PROMPT_FORMAT:
        raise APIError(400, f"model {model.id} has no chat template: it was not instruction-finetuned (use "
                            f"/v1/completions)", param="model")
    if messages[-1].role != "user":
        raise APIError(400, "the last message must be the user's", param="messages")
    return format_chat([(m.role, m.content) for m in messages])


async def _token_ids(engines: EngineClient, model: Model, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return await engines.encode(model, prompt)
    vocab = model.loaded.model.config.vocab_size
    if max(prompt) >= vocab:
        raise APIError(400, f"prompt token ids must be below {vocab}", param="prompt")
    return prompt


async def admit(engines: EngineClient, model: Model, prompts: list[str | list[int]], asked: Asked) -> Generation:
    """The request's sequences, admitted to the engine together (or not at all)."""
    try:
        ids = [await _token_ids(engines, model, prompt) for prompt in prompts]
        return engines.generate(model, ids, asked)
    except PromptTooLong as e:
        raise APIError(400, f"the prompt holds {e.n_tokens} tokens; this model's context is {e.context_length}",
                       param="prompt", code="context_length_exceeded") from None
    except APIError:
        raise
    except Exception as e:
        raise error_of(e, param="prompt") from None


async def completion(engines: EngineClient, body: CompletionRequest) -> "Answer":
    model = serving(engines, body.model)
    body.check_token_ids(model.loaded.model.config.vocab_size)
    scored = body.echo and body.logprobs is not None
    asked = replace(body.asked(body.max_tokens, grammar=await body.grammar(engines, model)),
                    n=body.best_of or body.n, logprobs=body.logprobs,
                    prompt_logprobs=(body.logprobs or 0) if scored or body.max_tokens == 0 else None)
    generation = await admit(engines, model, body.prompts(), asked)
    return Answer(generation, body, model, chat=False)


async def chat_completion(engines: EngineClient, body: ChatRequest) -> "Answer":
    model = serving(engines, body.model)
    body.check_token_ids(model.loaded.model.config.vocab_size)
    prompt = chat_prompt(body.messages, model)
    # the model goes on to a next section: the answer is over
    asked = body.asked(body.max_completion_tokens or body.max_tokens, (NEXT_SECTION,),
                       await body.grammar(engines, model))
    if body.logprobs:
        asked = replace(asked, logprobs=body.top_logprobs or 0)
    generation = await admit(engines, model, [prompt], asked)
    return Answer(generation, body, model, chat=True)


class Choice:
    """One sequence's answer so far: its text, finish reason, and the tokens its logprobs report."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text, self.finish_reason, self.cumulative_logprob = "", None, 0.0
        self.offsets = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = 0  # characters of the text before the next token reported

    def token_text(self, token: int) -> tuple[str, bytes]:
        raw = self.tokenizer.decode_bytes([token])
        return raw.decode("utf-8", errors="replace"), raw

    def next_offset(self, raw: bytes) -> int:
        """The offset of the token of these bytes in the text: the characters decoded before it."""
        offset = self.offset
        self.offset += len(self.offsets.decode(raw))
        return offset


class Answer:
    """The chunks or the whole answer of an admitted request."""

    def __init__(self, generation: Generation, body: Sampling, model: Model, chat: bool):
        self.generation, self.body, self.chat = generation, body, chat
        self.head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                     "model": model.id}
        tokenizer = model.loaded.tokenizer
        self.choices = [Choice(tokenizer) for _ in generation.streams]
        self.ending_tokens = {*(body.stop_token_ids or ()), *(() if body.ignore_eos else (tokenizer.eot_id,))}
        self.reported = bool(body.logprobs) if chat else body.logprobs is not None  # logprobs asked for
        self.echo = not chat and body.echo  # the prompt goes before the output

    # -- logprobs ------------------------------------------------------------------------------------------------
    def _in_output(self, event: StreamEvent) -> bool:
        """Whether the event's token belongs to the output (an EOS or stop token id ends it unseen)."""
        return event.token_id is not None and not (event.finish_reason and event.token_id in self.ending_tokens)

    def _completion_logprobs(self, choice: Choice, tokens: list[tuple[int, float | None, list]]) -> dict:
        """OpenAI's legacy logprobs of (token id, logprob, [(id, logprob) likeliest]) in order."""
        texts, logprobs, tops, offsets = [], [], [], []
        for token, logprob, top in tokens:
            text, raw = choice.token_text(token)
            texts.append(text)
            logprobs.append(logprob)
            offsets.append(choice.next_offset(raw))
            if logprob is None:
                tops.append(None)
                continue
            likeliest = {choice.token_text(t)[0]: lp for t, lp in top}
            tops.append({**likeliest, text: logprob})  # the chosen token too, as vLLM reports it
        return {"tokens": texts, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, choice: Choice, event: StreamEvent) -> list[dict]:
        def entry(token: int, logprob: float) -> dict:
            text, raw = choice.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(raw)}

        return [{**entry(event.token_id, event.logprob),
                 "top_logprobs": [entry(t, lp) for t, lp in event.top_logprobs or []]}]

    def _prompt_scores(self, index: int) -> list[tuple[int, float | None, list]]:
        return [(s.token_id, s.logprob, s.top_logprobs) for s in self.generation.request(index).prompt_scores]

    def _echo(self, index: int) -> tuple[str, dict | None]:
        """The prompt's text, and its logprobs when they were asked for, to go before the output."""
        choice = self.choices[index]
        prompt = self.generation.request(index).prompt
        text = choice.tokenizer.decode(prompt)
        scores = self._prompt_scores(index) if self.reported else None
        return text, scores and self._completion_logprobs(choice, scores)

    # -- whole ---------------------------------------------------------------------------------------------------
    async def whole(self) -> dict:
        logprobs: list[list] = [[] for _ in self.choices]  # per sequence: its chat entries, or its tokens
        try:
            async for index, event in self.generation.events():
                choice = self.choices[index]
                choice.text += event.text
                choice.finish_reason = event.finish_reason and FINISH[event.finish_reason]
                if self._in_output(event):
                    choice.cumulative_logprob += event.logprob
                    if self.reported:
                        logprobs[index].append(event)
        except Exception as e:
            raise error_of(e) from None
        chosen = self._best()
        choices = [self._whole_choice(position, index, logprobs[index]) for position, index in enumerate(chosen)]
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self.head, "object": kind, "choices": choices, "usage": self.usage()}

    def _best(self) -> list[int]:
        """The sequences answered: with best_of, the n likeliest of each prompt's best_of, prompt by prompt."""
        n, per_prompt = self.body.n, getattr(self.body, "best_of", None) or self.body.n
        kept = []
        for first in range(0, len(self.choices), per_prompt):
            group = sorted(range(first, first + per_prompt), key=lambda i: -self.choices[i].cumulative_logprob)
            kept += sorted(group[:n])
        return kept

    def _whole_choice(self, position: int, index: int, events: list[StreamEvent]) -> dict:
        choice = self.choices[index]
        if self.chat:
            return {"index": position, "message": {"role": "assistant", "content": choice.text},
                    "logprobs": {"content": [e for event in events for e in self._chat_logprobs(choice, event)]}
                    if self.reported else None, "finish_reason": choice.finish_reason}
        text, reported = choice.text, None
        if self.echo:
            prompt_text, reported = self._echo(index)
            text = prompt_text + text
        if self.reported:
            tokens = self._completion_logprobs(choice, [(e.token_id, e.logprob, e.top_logprobs or []) for e in events])
            reported = {key: (reported[key] if reported else []) + tokens[key] for key in tokens}
        return {"index": position, "text": text, "logprobs": reported, "finish_reason": choice.finish_reason}

    def usage(self) -> dict:
        g = self.generation
        return {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                "total_tokens": g.prompt_tokens + g.completion_tokens}

    # -- streamed ------------------------------------------------------------------------------------------------
    def _chunk(self, choices: list, **extra) -> str:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return f"data: {json.dumps({**self.head, 'object': kind, 'choices': choices, **extra})}\n\n"

    def _streamed_choice(self, index: int, event: StreamEvent) -> dict[str, Any]:
        choice = self.choices[index]
        reason = event.finish_reason and FINISH[event.finish_reason]
        counted = self._in_output(event) and self.reported
        if self.chat:
            return {"index": index, "delta": {"content": event.text} if event.text else {},
                    "logprobs": {"content": self._chat_logprobs(choice, event)} if counted else None,
                    "finish_reason": reason}
        logprobs = (self._completion_logprobs(choice, [(event.token_id, event.logprob, event.top_logprobs or [])])
                    if counted else None)
        return {"index": index, "text": event.text, "logprobs": logprobs, "finish_reason": reason}

    async def chunks(self):
        try:
            for index in range(len(self.choices)):  # what comes before the first token
                if self.chat:
                    yield self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
            echoed = set()
            async for index, event in self.generation.events():
                if self.echo and index not in echoed:  # the prompt's scores are complete by its first event
                    echoed.add(index)
                    text, logprobs = self._echo(index)
                    yield self._chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}])
                yield self._chunk([self._streamed_choice(index, event)])
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk([], usage=self.usage())
            yield "data: [DONE]\n\n"
        except Exception as e:
            error = error_of(e)
            yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.type}})}\n\n"


def models(served: list[Served]) -> dict:
    """Each deployment, and after it each of its adapters as `<deployment>:<adapter>` with the deployment as its
    parent (vLLM lists LoRA adapters so); root is the checkpoint served."""
    def card(model_id: str, checkpoint_id: str, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "scratchllm", "root": checkpoint_id,
                "parent": parent}

    return {"object": "list", "data": [
        entry for s in served for entry in (card(s.name, s.checkpoint_id, None), *(
            card(f"{s.name}:{name}", checkpoint_id, s.name) for name, checkpoint_id in s.adapters.items()))]}
