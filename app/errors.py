"""JSON errors that name the problem: {"error": {"type", "message", "param"}} with a 4xx status."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import Conflict, DomainError, Gone, Invalid, NotFound, Unavailable

STATUS_TYPES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
                415: "unsupported_media_type", 422: "validation_error", 429: "rate_limited",
                410: "gone", 503: "unavailable"}
RETRY_AFTER_S = 1  # told to a client that finds the server full
# the one place a domain error becomes an HTTP status
DOMAIN_STATUS = {Invalid: 422, NotFound: 404, Conflict: 409, Gone: 410, Unavailable: 503}


# The 503s a client must expect, declared in the OpenAPI document of the operations that answer them.
NOT_READY = {503: {"description": "the deployment is loading, or there is no default deployment: retry later"}}
QUEUE_UNAVAILABLE = {503: {"description": "the job queue does not take the job: it is failed, not queued"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 details: list | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or STATUS_TYPES.get(status, "error")
        self.details = details


def error_body(status: int, message: str, param: str | None = None, type_: str | None = None,
               details: list | None = None, code: str | None = None) -> dict:
    error = {"type": type_ or STATUS_TYPES.get(status, "error"), "message": message, "param": param, "code": code}
    if details:
        error["details"] = details
    return {"error": error}


def _is_union_tag(part) -> bool:
    """pydantic names the branch of a union in an error's location: `literal['gpt2']`, `BPESpec`,
    `constrained-int`."""
    return isinstance(part, str) and ("[" in part or part.startswith("constrained-")
                                      or (part[:1].isupper() and part.isidentifier()))


def _field_path(location: tuple) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header", "form")
             and not _is_union_tag(p)]
    return ".".join(parts) or ".".join(str(p) for p in location)


def _validation_details(request: Request, exc: RequestValidationError) -> tuple[int, list[dict]]:
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        position = next(e["loc"][-1] for e in errors if e["type"] == "json_invalid")
        return 422, [{"param": "body", "message": f"the body is not valid JSON (error at character {position})"}]
    content_type = request.headers.get("content-type", "")
    if any(tuple(e["loc"]) == ("body",) for e in errors) and request.method in ("POST", "PATCH", "PUT") \
            and "json" not in content_type:
        sent = content_type or "no content type"
        return 415, [{"param": "body", "message": f"send the body as application/json, not {sent}"}]
    # of a union's branches, the error of the branch the input was meant for is the one that explains it
    specific = [e for e in errors if e["type"] != "literal_error"] or errors
    return 422, [{"param": _field_path(tuple(e["loc"])), "message": e["msg"]} for e in specific]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if exc.status == 429 else None
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.type, exc.details, exc.code),
                            exc.status, headers=headers)

    @app.exception_handler(DomainError)
    async def _domain_error(_request: Request, exc: DomainError):
        status = next(code for kind, code in DOMAIN_STATUS.items() if isinstance(exc, kind))
        return JSONResponse(error_body(status, exc.message, exc.param), status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        status, details = _validation_details(request, exc)
        first = details[0] if details else {"param": None, "message": "invalid request"}
        message = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
        return JSONResponse(error_body(status, message, first["param"], details=details), status)

    @app.exception_handler(DataError)
    async def _unstorable(_request: Request, exc: DataError):
        # PostgreSQL refuses what SQLite takes: NUL characters in text, numbers beyond 64 bits
        problem = str(exc.orig).splitlines()[0] if exc.orig else type(exc).__name__
        return JSONResponse(error_body(422, f"a value in the request cannot be stored or searched: {problem}"), 422)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        # a fault of the server, not of the request: logged by uvicorn, answered in the same JSON shape
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); see the server log",
                                       type_="internal_error"), 500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(exc.status_code, message), exc.status_code, headers=exc.headers)
