"""FastAPI dependencies: settings, a database session per request, and lookups that 404 by name."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.db import Database
from app.errors import not_found
from app.models import Checkpoint, Corpus, Job
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_database(request: Request) -> Database:
    return request.app.state.database


def get_session(database: Annotated[Database, Depends(get_database)]) -> Iterator[Session]:
    with database.session() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def corpus_by_id(session: SessionDep, corpus_id: Annotated[str, Path(max_length=40)]) -> Corpus:
    corpus = session.get(Corpus, corpus_id)
    if corpus is None:
        raise not_found("corpus", corpus_id)
    return corpus


CorpusDep = Annotated[Corpus, Depends(corpus_by_id)]


def job_by_id(session: SessionDep, job_id: Annotated[str, Path(max_length=40)]) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


JobDep = Annotated[Job, Depends(job_by_id)]


def checkpoint_by_id(session: SessionDep, checkpoint_id: Annotated[str, Path(max_length=40)]) -> Checkpoint:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise not_found("checkpoint", checkpoint_id)
    return checkpoint


CheckpointDep = Annotated[Checkpoint, Depends(checkpoint_by_id)]


class PageParams:
    def __init__(self, after: Annotated[str | None, Query(max_length=40, description="last id of the previous page")]
                 = None, limit: Annotated[int, Query(ge=1, le=1000)] = 100):
        self.after, self.limit = after, limit

    def apply(self, session: Session, statement: Select, model) -> tuple[list, bool]:
        """Rows newest first (ids sort by creation), after the cursor; and whether more follow."""
        if self.after is not None:
            statement = statement.where(model.id < self.after)
        rows = list(session.scalars(statement.order_by(model.id.desc()).limit(self.limit + 1)))
        return rows[: self.limit], len(rows) > self.limit


PageDep = Annotated[PageParams, Depends()]
