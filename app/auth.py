"""Who is calling: API keys (`Authorization: Bearer <key>`, stored as sha256 hashes) with a scope, or the open
single-user mode.

Keys are required unless SCRATCHLLM_API_KEYS_REQUIRED is false, which `scratchllm up` sets when it serves on a
loopback address. That open mode answers only loopback clients that name a loopback host (a web page that
rebinds its own DNS name to 127.0.0.1 still sends its own name), and even then managing keys needs an admin key:
the first one comes from `scratchllm keys create`, never from an anonymous request.

The caller is identified from the headers before the body is read (`Authenticate`), so an anonymous request
costs the server no body; each route then asks for the scope it needs (the dependencies below).
"""

import ipaddress
from datetime import timedelta

from fastapi import Depends, Request
from sqlalchemy import select, update
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from app.errors import APIError, error_body
from core.db import Database, utcnow
from core.enums import KeyScope
from core.keys import hash_key
from core.settings import Settings
from core.tables import ApiKey

LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most this often
# what anyone may read: liveness, readiness without names, and the API's description (the same for every server)
PUBLIC_PATHS = frozenset({"/livez", "/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
DASHBOARD_PAGE, DASHBOARD_ASSETS = "/", "/ui/"
# the most a request needs in open mode: everything but managing keys
OPEN_MODE_SCOPE = KeyScope.DEPLOY


def is_public(method: str, path: str) -> bool:
    """Whether a request needs no key: the health checks, the API's description, and the dashboard's page and
    assets (it asks for a key itself, and every call it makes sends one)."""
    dashboard = method in ("GET", "HEAD") and (path == DASHBOARD_PAGE or path.startswith(DASHBOARD_ASSETS))
    return path in PUBLIC_PATHS or dashboard


def is_loopback_host(host: str) -> bool:
    """A loopback address or the name localhost (with or without a port)."""
    if host.startswith("["):  # [::1]:8000
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _key_of(database: Database, key: str) -> ApiKey | None:
    with database.session() as session:
        api_key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
        if api_key is not None:
            now = utcnow()
            if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
                session.execute(update(ApiKey).where(ApiKey.id == api_key.id).values(last_used_at=now))
        return api_key


class Authenticate:
    """ASGI middleware: puts the caller's key (or None) in the request state, or answers 401/403 itself."""

    def __init__(self, app, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or is_public(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            api_key = await self._caller(scope)
        except APIError as e:
            response = JSONResponse(error_body(e.status, e.message, e.param, e.type), e.status)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {}).update(api_key=api_key, open_mode=not self.settings.api_keys_required)
        await self.app(scope, receive, send)

    async def _caller(self, scope) -> ApiKey | None:
        headers = Headers(scope=scope)
        if not self.settings.api_keys_required:
            client = scope.get("client") or ("", 0)
            if not (is_loopback_host(client[0]) and is_loopback_host(headers.get("host", ""))):
                raise APIError(403, "this server runs without API keys and so answers only requests made to "
                                    "localhost from this machine")
        header = headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header or scheme.lower() != "bearer" or not key.strip():
            if not self.settings.api_keys_required:
                return None
            raise APIError(401, "malformed Authorization header: expected 'Bearer <key>'" if header else
                           "this endpoint needs an API key: send 'Authorization: Bearer <key>' (an admin makes "
                           "keys; the first comes from `scratchllm keys create`)")
        database = scope["app"].state.services.database
        api_key = await run_in_threadpool(_key_of, database, key.strip())
        if api_key is None and self.settings.api_keys_required:
            raise APIError(401, "unknown or revoked API key")
        return api_key  # in open mode an unknown key is no key (OpenAI's client always sends one)


def _require(request: Request, needed: KeyScope) -> ApiKey | None:
    api_key: ApiKey | None = getattr(request.state, "api_key", None)
    if api_key is None:
        if getattr(request.state, "open_mode", False) and OPEN_MODE_SCOPE.rank >= needed.rank:
            return None
        raise APIError(401, f"this endpoint needs an API key of scope {needed.value!r}, even on a server without "
                            "keys; the first admin key comes from `scratchllm keys create`")
    if KeyScope(api_key.scope).rank < needed.rank:
        raise APIError(403, f"this key's scope is {api_key.scope!r}; the request needs {needed.value!r}")
    return api_key


async def read_or_train(request: Request) -> ApiKey | None:
    """Reading needs `read`; anything that changes state needs `train`."""
    return _require(request, KeyScope.READ if request.method in ("GET", "HEAD") else KeyScope.TRAIN)


async def reader(request: Request) -> ApiKey | None:
    """Inference: any key will do, whatever the method."""
    return _require(request, KeyScope.READ)


async def deployer(request: Request) -> ApiKey | None:
    """Changing what is served, and deleting corpora and checkpoints."""
    return _require(request, KeyScope.DEPLOY)


async def admin(request: Request) -> ApiKey | None:
    return _require(request, KeyScope.ADMIN)


def document_security(schema: dict) -> dict:
    """The OpenAPI document with the bearer key declared on every operation but the public ones."""
    schema.setdefault("components", {})["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key from POST /v1/api-keys or "
                   "`scratchllm keys create`; its scope (read < train < deploy < admin) must cover the request"}}
    for path, operations in schema["paths"].items():
        if path in PUBLIC_PATHS:
            continue
        for operation in operations.values():
            operation["security"] = [{"apiKey": []}]
            operation.setdefault("responses", {}).update({
                "401": {"description": "no API key, or one that is unknown or revoked"},
                "403": {"description": "the key's scope does not cover this request"}})
    return schema


ReadOrTrain = Depends(read_or_train)
Reader = Depends(reader)
Deployer = Depends(deployer)
Admin = Depends(admin)
