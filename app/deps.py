"""FastAPI dependencies: settings, a database session per request, and lookups that 404 by name."""

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.db import Database
from app.errors import not_found
from app.models import Checkpoint, Corpus, Evaluation, Job
from app.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_database(request: Request) -> Database:
    return request.app.state.database


DatabaseDep = Annotated[Database, Depends(get_database)]


def get_session(database: DatabaseDep) -> Iterator[Session]:
    with database.session() as session:
        yield session


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]


def _row_or_404(session: Session, model, row_id: str, kind: str):
    row = session.get(model, row_id)
    if row is None:
        raise not_found(kind, row_id)
    return row


def corpus_by_id(session: SessionDep, corpus_id: Annotated[str, Path(max_length=40)]) -> Corpus:
    return _row_or_404(session, Corpus, corpus_id, "corpus")


def job_by_id(session: SessionDep, job_id: Annotated[str, Path(max_length=40)]) -> Job:
    return _row_or_404(session, Job, job_id, "job")


def checkpoint_by_id(session: SessionDep, checkpoint_id: Annotated[str, Path(max_length=40)]) -> Checkpoint:
    return _row_or_404(session, Checkpoint, checkpoint_id, "checkpoint")


def evaluation_by_id(session: SessionDep, evaluation_id: Annotated[str, Path(max_length=40)]) -> Evaluation:
    return _row_or_404(session, Evaluation, evaluation_id, "evaluation")


CorpusDep = Annotated[Corpus, Depends(corpus_by_id)]
JobDep = Annotated[Job, Depends(job_by_id)]
CheckpointDep = Annotated[Checkpoint, Depends(checkpoint_by_id)]
EvaluationDep = Annotated[Evaluation, Depends(evaluation_by_id)]


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
