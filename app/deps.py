"""FastAPI dependencies: the application's services, typed, a database session per request, and lookups
that 404 by id."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.metrics import Metrics
from core.db import Database
from core.errors import NotFound
from core.queue import JobQueue
from core.settings import Settings
from core.storage import DataDir
from core.tables import Checkpoint, Corpus, Evaluation, Job
from serving.client import EngineClient
from serving.deployments import DeploymentManager

# the lookups are coroutines: FastAPI would run plain functions in its threadpool, a thread hop per request each


@dataclass
class Services:
    """What an API process runs on, made once at start-up (app.main)."""

    settings: Settings
    database: Database
    queue: JobQueue
    deployments: DeploymentManager
    engines: EngineClient
    metrics: Metrics


async def services(request: Request) -> Services:
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(services)]


async def _settings(services: ServicesDep) -> Settings:
    return services.settings


async def _storage(services: ServicesDep) -> DataDir:
    return services.settings.storage


async def _database(services: ServicesDep) -> Database:
    return services.database


async def _queue(services: ServicesDep) -> JobQueue:
    return services.queue


async def _deployments(services: ServicesDep) -> DeploymentManager:
    return services.deployments


async def _engines(services: ServicesDep) -> EngineClient:
    return services.engines


SettingsDep = Annotated[Settings, Depends(_settings)]
StorageDep = Annotated[DataDir, Depends(_storage)]
DatabaseDep = Annotated[Database, Depends(_database)]
QueueDep = Annotated[JobQueue, Depends(_queue)]
DeploymentsDep = Annotated[DeploymentManager, Depends(_deployments)]
EnginesDep = Annotated[EngineClient, Depends(_engines)]


def _session(database: DatabaseDep) -> Iterator[Session]:
    with database.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(_session)]


def _row_or_404(session: Session, model, row_id: str, kind: str):
    row = session.get(model, row_id)
    if row is None:
        raise NotFound.of(kind, row_id)
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
