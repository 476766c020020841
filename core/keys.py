"""API keys: made here, shown once, stored only as their sha256 (the API checks them: app.auth)."""

import hashlib
import secrets

from sqlalchemy.orm import Session

from core.enums import KeyScope
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
