"""API keys (admin scope): create (the key is shown once), list, revoke."""

from typing import Annotated

from fastapi import APIRouter, Depends
from sqlalchemy import select

from app.auth import OPEN_MODE_SCOPE, Admin, reader
from app.deps import PageDep, SessionDep
from app.schemas.common import Page
from app.schemas.keys import Caller, KeyCreate, KeyCreated, KeyOut
from core.keys import create_key, revoke_key
from core.tables import ApiKey

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"], dependencies=[Admin])
caller_router = APIRouter(prefix="/v1", tags=["api keys"])


@caller_router.get("/me", response_model=Caller)
def me(api_key: Annotated[ApiKey | None, Depends(reader)]) -> Caller:
    """Who is calling: the key's name and scope (what the dashboard may offer), or the open mode's scope."""
    if api_key is None:
        return Caller(scope=OPEN_MODE_SCOPE, key_name=None, open_mode=True)
    return Caller(scope=api_key.scope, key_name=api_key.name, open_mode=False)


@router.post("", status_code=201, response_model=KeyCreated)
def create(body: KeyCreate, session: SessionDep) -> dict:
    api_key, key = create_key(session, body.name, body.scope)
    session.commit()
    return {**KeyOut.model_validate(api_key).model_dump(), "key": key}


@router.get("", response_model=Page[KeyOut])
def list_keys(session: SessionDep, page: PageDep) -> dict:
    rows, has_more = page.apply(session, select(ApiKey), ApiKey)
    return {"data": rows, "has_more": has_more}


@router.delete("/{key_id}", response_model=KeyOut)
def revoke(key_id: str, session: SessionDep) -> ApiKey:
    api_key = revoke_key(session, key_id)
    session.commit()
    return api_key
