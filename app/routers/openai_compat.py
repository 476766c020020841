"""OpenAI-compatible inference: `/v1/models`, `/v1/completions`, `/v1/chat/completions`."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.auth import Reader
from app.deps import DeploymentsDep, EnginesDep
from app.errors import NOT_READY
from app.protocols import openai

router = APIRouter(prefix="/v1", tags=["inference (OpenAI)"], dependencies=[Reader])


async def _respond(answer: openai.Answer):
    generation = answer.generation
    if not answer.body.stream:
        try:
            return JSONResponse(await answer.whole())
        finally:
            generation.abort()

    async def stream():
        try:
            async for chunk in answer.chunks():
                yield chunk
        finally:
            generation.abort()

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/models")
def list_models(deployments: DeploymentsDep) -> dict:
    return openai.models(deployments.all())


@router.post("/completions", responses=NOT_READY)
async def completions(request: Request, engines: EnginesDep):
    body = await openai.parse(request, openai.CompletionRequest)
    return await _respond(await openai.completion(engines, body))


@router.post("/chat/completions", responses=NOT_READY)
async def chat_completions(request: Request, engines: EnginesDep):
    body = await openai.parse(request, openai.ChatRequest)
    return await _respond(await openai.chat_completion(engines, body))
