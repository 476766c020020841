"""A cap on request bodies, enforced as they arrive: a declared Content-Length over it is refused at the first
read, before any byte of the body, and a chunked body is cut off as soon as it passes it. A route that takes
more (an upload, streamed to disk) raises its own request's cap with `allow_body` before it reads."""

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

BODY_LIMIT = "scratchllm.body_limit"  # the request's cap, in its ASGI scope


def allow_body(scope, limit: int) -> None:
    scope[BODY_LIMIT] = limit


class LimitBodies:
    """ASGI middleware: every request body at most `limit` bytes unless its route allows more."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[BODY_LIMIT] = self.limit
        declared = Headers(scope=scope).get("content-length", "")
        received = 0

        async def receive_at_most() -> dict:
            nonlocal received
            limit = scope[BODY_LIMIT]
            if declared.isdigit() and int(declared) > limit:
                raise _too_large(limit)
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
            return message

        await self.app(scope, receive_at_most, send)


def _too_large(limit: int) -> HTTPException:
    # an HTTPException, which FastAPI lets through its body parsing to the error handlers
    return HTTPException(413, f"the request body exceeds the limit of {limit:,} bytes")
