"""Tokens in and out: `POST /tokenize` in vLLM's shape or TGI's (the body tells which), `POST /detokenize` in vLLM's,
and TGI's `POST /d/{deployment}/tokenize` for a named deployment (`deployment_router`, mounted under that prefix).

The bodies are declared for the OpenAPI document but validated below, by the protocol each turns out to be, so
that each protocol words its own refusals (TGI 422 `{error, error_type}`, vLLM 400 `{"error": {...}}`).
"""

from collections.abc import Awaitable
from typing import Annotated

from fastapi import APIRouter, Body
from fastapi.responses import JSONResponse
from pydantic import SkipValidation

from app.auth import Reader
from app.deps import EnginesDep
from app.errors import NOT_READY
from app.protocols import tokens
from app.protocols.tgi import GenerateRequest, TGIError

REFUSALS = {
    400: {"description": "vLLM's refusal: a field out of range, a token id outside the vocabulary, chat messages "
                         "to a deployment without a chat template"},
    404: {"description": "no deployment of that name"},
    413: {"description": "a prompt longer than the service tokenizes (or more token ids than it decodes)"},
    415: {"description": "no body"},
    422: {"description": "a body that is not JSON, TGI's refusal of its request, or a /tokenize body in neither "
                         "protocol's shape"},
}
router = APIRouter(tags=["tokens"], dependencies=[Reader], responses={**NOT_READY, **REFUSALS})
deployment_router = APIRouter(tags=["tokens"], dependencies=[Reader], responses={**NOT_READY, **REFUSALS})

TokenizeBody = Annotated[GenerateRequest | tokens.PromptTokenize | tokens.ChatTokenize, SkipValidation,
                         Body(description="TGI's `inputs`, or vLLM's `prompt` or `messages`")]
TGIBody = Annotated[GenerateRequest, SkipValidation, Body()]
DetokenizeBody = Annotated[tokens.Detokenize, SkipValidation, Body()]


async def _answer(answer: Awaitable) -> JSONResponse:
    """The answer, or TGI's error in TGI's shape (vLLM's are APIErrors, which the app's handler words)."""
    try:
        return JSONResponse(await answer)
    except TGIError as e:
        return JSONResponse(e.body(), e.status, headers=e.headers)


@router.post("/tokenize", response_model=tokens.Tokens | list[tokens.TGIToken])
async def tokenize(body: TokenizeBody, engines: EnginesDep) -> JSONResponse:
    """vLLM's answer to `prompt` or `messages` (the deployment is `model`), TGI's to `inputs` (the default one)."""
    return await _answer(tokens.tokenize(engines, body))


@router.post("/detokenize", response_model=tokens.Detokenized)
async def detokenize(body: DetokenizeBody, engines: EnginesDep) -> JSONResponse:
    return JSONResponse(await tokens.detokenize(engines, body))


@deployment_router.post("/tokenize", response_model=list[tokens.TGIToken])
async def tokenize_deployment(deployment: str, body: TGIBody, engines: EnginesDep) -> JSONResponse:
    return await _answer(tokens.tgi_tokenize(engines, body, deployment))
