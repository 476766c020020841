"""API keys (admin scope): create (the key is shown once), list, revoke."""

from fastapi import APIRouter
from sqlalchemy import select

from app.auth import Admin
from app.deps import PageDep, SessionDep
from app.schemas.common import Page
from app.schemas.keys import KeyCreate, KeyCreated, KeyOut
from core.keys import create_key, revoke_key
from core.tables import ApiKey

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"], dependencies=[Admin])


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
