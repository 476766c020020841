"""API keys: made here, shown once, stored only as their sha256 (the API checks them: app.auth)."""

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db import utcnow
from core.enums import KeyScope
from core.errors import Conflict, NotFound
from core.tables import ApiKey

KEY_PREFIX = "sk-scratch-"


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(session: Session, name: str, scope: KeyScope) -> tuple[ApiKey, str]:
    """A new key's row and the key itself, which is never stored."""
    key = new_key()
    api_key = ApiKey(name=name, scope=scope, key_hash=hash_key(key), prefix=key[:15])
    session.add(api_key)
    session.flush()
    return api_key, key


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key; never the last admin key, without which nobody could manage keys through the API."""
    api_key = session.get(ApiKey, key_id, with_for_update=True)
    if api_key is None:
        raise NotFound.of("api key", key_id)
    if api_key.revoked_at is not None:
        raise Conflict(f"api key {key_id} is already revoked", param="key_id")
    if api_key.scope == KeyScope.ADMIN:
        # locks every live admin row where the database can, so two concurrent revocations cannot both pass
        live_admins = session.scalars(select(ApiKey.id).where(ApiKey.scope == KeyScope.ADMIN,
                                                              ApiKey.revoked_at.is_(None)).with_for_update()).all()
        if len(live_admins) <= 1:
            raise Conflict(f"api key {key_id} is the last admin key: create another admin key before revoking it",
                           param="key_id")
    api_key.revoked_at = utcnow()
    return api_key
