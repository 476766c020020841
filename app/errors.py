"""JSON errors that name the problem: {"error": {"type", "message", "param"}} with a 4xx status."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

STATUS_TYPES = {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
                415: "unsupported_media_type", 422: "validation_error", 429: "rate_limited",
                503: "unavailable"}


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


def not_found(kind: str, id_: str) -> APIError:
    return APIError(404, f"no {kind} with id {id_!r}", param="id")


def _field_path(location: tuple) -> str:
    parts = [str(p) for p in location if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or ".".join(str(p) for p in location)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.type, exc.details, exc.code),
                            exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError):
        details = [{"param": _field_path(tuple(e["loc"])), "message": e["msg"]} for e in exc.errors()]
        first = details[0] if details else {"param": None, "message": "invalid request"}
        message = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
        return JSONResponse(error_body(422, message, first["param"], details=details), 422)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        # a fault of the server, not of the request: logged by uvicorn, answered in the same JSON shape
        return JSONResponse(error_body(500, f"internal error ({type(exc).__name__}); see the server log",
                                       type_="internal_error"), 500)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return JSONResponse(error_body(exc.status_code, message), exc.status_code, headers=exc.headers)
