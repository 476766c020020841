"""OpenAI-compatible inference: `/v1/models`, `/v1/completions`, `/v1/chat/completions`."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.auth import Reader
from app.deps import DeploymentsDep, EnginesDep
from app.errors import NOT_READY
from app.protocols import openai
from serving.client import Generation

router = APIRouter(prefix="/v1", tags=["inference (OpenAI)"], dependencies=[Reader])


async def _respond(generation: Generation, body: openai.Sampling, model: str, chat: bool):
    answer = openai.Answer(generation, body, model, chat)
    if not body.stream:
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
    generation, model = await openai.completion(engines, body)
    return await _respond(generation, body, model, chat=False)


@router.post("/chat/completions", responses=NOT_READY)
async def chat_completions(request: Request, engines: EnginesDep):
    body = await openai.parse(request, openai.ChatRequest)
    generation, model = await openai.chat_completion(engines, body)
    return await _respond(generation, body, model, chat=True)
