"""API keys: `Authorization: Bearer <key>` with a scope (read < train < admin), stored as sha256 hashes.

While no key exists (and SCRATCHLLM_API_KEYS_REQUIRED is off) the API is open, so a fresh install works
at once and its first admin key can be created through the API; from the first key on, every endpoint
but the health checks needs a key.
"""

from datetime import timedelta

from fastapi import Depends, Request
from sqlalchemy import select, update

from app.deps import DatabaseDep, SettingsDep
from app.errors import APIError
from core.db import Database, utcnow
from core.enums import KeyScope
from core.keys import hash_key
from core.tables import ApiKey

LAST_USED_RESOLUTION = timedelta(minutes=1)  # last_used_at is written at most this often


def _check(request: Request, database: Database, settings, needed: KeyScope) -> ApiKey | None:
    # a session of its own, closed before the endpoint runs: a streamed answer must not hold a
    # database connection for as long as it streams
    with database.session() as session:
        return _check_in(request, session, settings, needed)


def _check_in(request: Request, session, settings, needed: KeyScope) -> ApiKey | None:
    if not settings.api_keys_required and session.scalar(
            select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is None:
        return None  # no keys yet: open, whatever a client sends (OpenAI's client always sends one)
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if not header:
        raise APIError(401, "this endpoint needs an API key: send 'Authorization: Bearer <key>'")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "malformed Authorization header: expected 'Bearer <key>'")
    api_key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key.strip()),
                                                  ApiKey.revoked_at.is_(None)))
    if api_key is None:
        raise APIError(401, "unknown or revoked API key")
    if KeyScope(api_key.scope).rank < needed.rank:
        raise APIError(403, f"this key's scope is {api_key.scope!r}; the request needs {needed.value!r}")
    now = utcnow()
    if api_key.last_used_at is None or now - api_key.last_used_at > LAST_USED_RESOLUTION:
        session.execute(update(ApiKey).where(ApiKey.id == api_key.id).values(last_used_at=now))
    return api_key


def read_or_train(request: Request, database: DatabaseDep, settings: SettingsDep) -> ApiKey | None:
    """Reading needs `read`; anything that changes state needs `train`."""
    needed = KeyScope.READ if request.method in ("GET", "HEAD") else KeyScope.TRAIN
    return _check(request, database, settings, needed)


def reader(request: Request, database: DatabaseDep, settings: SettingsDep) -> ApiKey | None:
    """Inference: any key will do, whatever the method."""
    return _check(request, database, settings, KeyScope.READ)


def admin(request: Request, database: DatabaseDep, settings: SettingsDep) -> ApiKey | None:
    return _check(request, database, settings, KeyScope.ADMIN)


ReadOrTrain = Depends(read_or_train)
Reader = Depends(reader)
Admin = Depends(admin)
