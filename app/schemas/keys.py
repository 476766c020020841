from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import one_of
from core.enums import KeyScope

Scope = one_of(*KeyScope)


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=100)
    scope: Scope = KeyScope.READ.value


class Caller(BaseModel):
    object: Literal["caller"] = "caller"
    scope: Scope
    key_name: str | None
    open_mode: bool  # no keys on this server: its one local user


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    scope: Scope
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str  # shown once, at creation; only its hash is stored
