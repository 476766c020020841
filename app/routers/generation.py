"""Text generation in the shapes of Hugging Face text-generation-inference (TGI).

`POST /generate`, `POST /generate_stream` (server-sent events), `POST /` (either, by `stream`), `GET /info`;
under `/d/{deployment}/...` for a named deployment, at the root for the default one. A request is validated
and admitted to the engine before any byte of the answer is sent: a bad or unlucky request never starts a
stream.
"""

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.auth import Reader
from app.deps import EnginesDep
from app.errors import NOT_READY
from app.protocols import tgi
from app.protocols.tgi import TGIError

router = APIRouter(tags=["generation (TGI)"], dependencies=[Reader], responses=NOT_READY)


async def _generate(answer: tgi.Answer, as_list: bool) -> JSONResponse:
    sequences = [[] for _ in answer.generation.streams]
    try:
        async for index, event in answer.generation.events():
            sequences[index].append(event)
    except Exception as e:
        raise TGIError.of(e) from None
    finally:
        answer.generation.abort()  # a no-op once finished; stops the sequence if this request was cancelled
    body = answer.answer(sequences)
    return JSONResponse([body] if as_list else body)


def _generate_stream(answer: tgi.Answer) -> StreamingResponse:
    async def events():
        texts = []
        try:
            index = 0
            async for _, event in answer.generation.events():
                index += 1
                texts.append(event.text)
                yield f"data:{json.dumps(answer.stream_message(index, event, texts))}\n\n"
        except Exception as e:
            yield f"data:{json.dumps(TGIError.of(e).body())}\n\n"
        finally:
            answer.generation.abort()  # the client went away (or the stream ended): free the slot

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _answer(request: Request, engines, deployment: str | None, stream: bool | None, as_list: bool = False):
    try:
        body = await tgi.parse(request)
        streamed = body.stream if stream is None else stream
        answer = await tgi.admit(engines, body, deployment, streamed)
        if streamed:
            return _generate_stream(answer)
        return await _generate(answer, as_list)
    except TGIError as e:
        return JSONResponse(e.body(), e.status, headers=e.headers)


@router.post("/generate")
async def generate(request: Request, engines: EnginesDep, deployment: str | None = None):
    return await _answer(request, engines, deployment, stream=False)


@router.post("/generate_stream")
async def generate_stream(request: Request, engines: EnginesDep, deployment: str | None = None):
    return await _answer(request, engines, deployment, stream=True)


@router.post("/")
async def generate_either(request: Request, engines: EnginesDep, deployment: str | None = None):
    """TGI's compatibility route: `stream` in the body chooses; the non-streaming answer is a list."""
    return await _answer(request, engines, deployment, stream=None, as_list=True)


@router.get("/info")
def info(engines: EnginesDep, deployment: str | None = None):
    try:
        return tgi.info(tgi.serving(engines, deployment))
    except TGIError as e:
        return JSONResponse(e.body(), e.status, headers=e.headers)
