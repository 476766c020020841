"""Tokens in and out, in vLLM's shapes (`/tokenize` of a prompt or of chat messages, `/detokenize`) and in TGI's
(`/tokenize` of `inputs`: each token with its text and character offsets). Both protocols answer at /tokenize, so
its body tells them apart: `inputs` is TGI's, `prompt` or `messages` vLLM's; each answers its errors in its shape.

A text is tokenized as the inference routes tokenize a prompt (special-token text as plain text, within the size
limit, off the event loop), so a count here is the count generation sees. These tokenizers add no BOS or EOS, so
vLLM's `add_special_tokens` changes nothing (as for GPT-2 in vLLM). Any deployment may be tokenized, a classifier
too: /classify tokenizes its texts the same way, and its context is what `truncate` cuts them to.
"""

import asyncio
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import APIError
from app.protocols import openai
from app.protocols.failures import first_problem
from app.protocols.tgi import GenerateRequest, TGIError
from core.enums import CheckpointTask
from model import format_response
from model.tokenizer import Tokenizer
from serving.client import EngineClient, Model
from serving.deployments import NotServing

SHAPES = ("inputs", "prompt", "messages")  # the field that tells each request shape of /tokenize apart
GENERATION_PROMPT = format_response({"output": ""})  # how the chat template ends: the answer's header
Schema = TypeVar("Schema", bound=BaseModel)


class VLLMRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's fields of no use here (add_special_tokens, ...)

    model: str | None = Field(None, description="the deployment; default: the default deployment")


class PromptTokenize(VLLMRequest):
    prompt: str
    return_token_strs: bool = False


class ChatTokenize(VLLMRequest):
    messages: list[openai.Message] = Field(min_length=1)
    add_generation_prompt: bool = Field(True, description="end with the header the model answers after")
    return_token_strs: bool = False


class Tokens(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(None, description="each token decoded alone; with return_token_strs")


class Detokenize(VLLMRequest):
    tokens: list[int]


class Detokenized(BaseModel):
    prompt: str


class TGIToken(BaseModel):
    id: int
    text: str = Field(description="inputs[start:stop]")
    start: int = Field(description="the token's first character in inputs")
    stop: int = Field(description="past its last character: a character split across tokens is in each of them")


def _validated(schema: type[Schema], body: Any) -> Schema:
    """vLLM's refusal of a body: 400 naming the field."""
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        param, message = first_problem(e)
        raise APIError(400, message, param=param) from None


def _tgi_request(body: Any) -> GenerateRequest:
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as e:
        raise TGIError(422, first_problem(e)[1], "validation") from None


def _shape(body: Any) -> str:
    named = [field for field in SHAPES if field in body] if isinstance(body, dict) else []
    if len(named) != 1:
        held = f"; this one holds {' and '.join(named)}" if named else ""
        raise APIError(422, "a /tokenize body is a JSON object holding one of inputs (TGI's shape), prompt or "
                            f"messages (vLLM's){held}", param="body")
    return named[0]


def _deployment(engines: EngineClient, name: str | None) -> Model:
    """The deployment, whatever its task: a classifier's tokenizer is the one /classify encodes with."""
    try:
        return engines.serving(name, CheckpointTask.LM)
    except NotServing as e:
        if e.reason != NotServing.Reason.WRONG_TASK:
            raise
    return engines.serving(name, CheckpointTask.CLASSIFIER)


def _vllm_deployment(engines: EngineClient, name: str | None) -> Model:
    try:
        return _deployment(engines, name)
    except NotServing as e:
        raise openai.error_of(e, param="model") from None


async def tokenize(engines: EngineClient, body: Any) -> dict | list[dict]:
    """The answer to /tokenize in the shape of the body's protocol."""
    shape = _shape(body)
    if shape == "inputs":
        return await tgi_tokenize(engines, body, None)
    return await _vllm_tokenize(engines, _validated(PromptTokenize if shape == "prompt" else ChatTokenize, body))


def _chat_text(body: ChatTokenize, model: Model) -> str:
    prompt = openai.chat_prompt(body.messages, model)
    return prompt if body.add_generation_prompt else prompt.removesuffix(GENERATION_PROMPT)


def _token_strs(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


async def _vllm_tokenize(engines: EngineClient, body: PromptTokenize | ChatTokenize) -> dict:
    model = _vllm_deployment(engines, body.model)
    chat = isinstance(body, ChatTokenize)
    text = _chat_text(body, model) if chat else body.prompt
    try:
        ids = await engines.encode(model, text)
    except Exception as e:
        raise openai.error_of(e, param="messages" if chat else "prompt") from None
    tokenizer = model.loaded.tokenizer
    strs = await asyncio.to_thread(_token_strs, tokenizer, ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": model.loaded.model.config.context_length, "tokens": ids,
            "token_strs": strs}


def _decode(tokenizer: Tokenizer, ids: list[int]) -> str:
    bad = next((i for i in ids if not 0 <= i < tokenizer.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is not in the vocabulary (ids 0 to {tokenizer.vocab_size - 1})",
                       param="tokens")
    return tokenizer.decode(ids)


async def detokenize(engines: EngineClient, body: Any) -> dict:
    request = _validated(Detokenize, body)
    limit = engines.max_prompt_chars
    if len(request.tokens) > limit:
        # a prompt within the size limit has no more tokens than characters: more would only amplify the answer
        raise APIError(413, f"tokens holds {len(request.tokens)} ids; at most {limit} are decoded", param="tokens")
    model = _vllm_deployment(engines, request.model)
    return {"prompt": await asyncio.to_thread(_decode, model.loaded.tokenizer, request.tokens)}


def _char_spans(pieces: list[bytes]) -> list[tuple[int, int]]:
    """[start, stop) in characters of the text whose UTF-8 the pieces make up, for each piece: the characters its
    bytes belong to. A character whose bytes are split across pieces belongs to each of them, as in Hugging Face
    tokenizers' offsets, which TGI answers with."""
    spans, begun = [], 0  # begun: characters whose first byte came before this piece
    for piece in pieces:
        continues = bool(piece) and 0x80 <= piece[0] < 0xC0  # starts inside the previous character
        start = begun - continues
        begun += sum(not 0x80 <= b < 0xC0 for b in piece)
        spans.append((start, begun))
    return spans


def _tgi_tokens(tokenizer: Tokenizer, text: str, ids: list[int], keep: int | None) -> list[dict]:
    spans = _char_spans(tokenizer.token_bytes(ids))
    tokens = [{"id": i, "text": text[start:stop], "start": start, "stop": stop}
              for i, (start, stop) in zip(ids, spans, strict=True)]
    return tokens if keep is None else tokens[-keep:]


async def tgi_tokenize(engines: EngineClient, body: Any, deployment: str | None) -> list[dict]:
    """TGI's tokens of the inputs; `parameters.truncate` keeps the last ones, as /generate does."""
    request = _tgi_request(body)
    try:
        model = _deployment(engines, deployment)
        ids = await engines.encode(model, request.inputs)
    except Exception as e:
        raise TGIError.of(e) from None
    return await asyncio.to_thread(_tgi_tokens, model.loaded.tokenizer, request.inputs, ids,
                                   request.parameters.truncate)
