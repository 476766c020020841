"""Evaluations: score a checkpoint on a corpus as a job, read the numbers and examples, compare checkpoints."""

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app.auth import ReadOrTrain
from app.deps import EvaluationDep, PageDep, QueueDep, SessionDep, SettingsDep
from app.errors import QUEUE_UNAVAILABLE
from app.schemas.common import Page
from app.schemas.evaluations import (
    Comparison,
    ComparisonRow,
    EvaluationCreate,
    EvaluationKindName,
    EvaluationOut,
    ExamplePage,
)
from app.schemas.jobs import JobStatusName
from app.services import evaluations
from app.services.jobs import send_job
from core import jobs
from core.tables import Checkpoint, Evaluation, EvaluationExample, Job

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"], dependencies=[ReadOrTrain])
IdQuery = Annotated[str | None, Query(max_length=40)]


@router.post("", status_code=201, response_model=EvaluationOut, responses=QUEUE_UNAVAILABLE)
def submit_evaluation(body: EvaluationCreate, session: SessionDep, queue: QueueDep,
                      settings: SettingsDep) -> EvaluationOut:
    evaluation = evaluations.create_evaluation(session, settings, body)
    session.commit()
    send_job(queue, session, evaluation.job)
    return EvaluationOut.of(evaluation)


@router.get("", response_model=Page[EvaluationOut])
def list_evaluations(session: SessionDep, page: PageDep, checkpoint_id: IdQuery = None, corpus_id: IdQuery = None,
                     training_job_id: Annotated[str | None, Query(
                         max_length=40, description="evaluations of this training job's checkpoints")] = None,
                     job_id: Annotated[str | None, Query(max_length=40, description="the evaluate job")] = None,
                     kind: Annotated[EvaluationKindName | None, Query()] = None,
                     status: Annotated[JobStatusName | None, Query()] = None) -> dict:
    statement = select(Evaluation).join(Evaluation.job).options(selectinload(Evaluation.job))
    if checkpoint_id is not None:
        statement = statement.where(Evaluation.checkpoint_id == checkpoint_id)
    if corpus_id is not None:
        statement = statement.where(Evaluation.corpus_id == corpus_id)
    if training_job_id is not None:
        statement = statement.where(Evaluation.checkpoint_id.in_(
            select(Checkpoint.id).where(Checkpoint.job_id == training_job_id)))
    if job_id is not None:
        statement = statement.where(Evaluation.job_id == job_id)
    if kind is not None:
        statement = statement.where(Evaluation.kind == kind)
    if status is not None:
        statement = statement.where(Job.status == status)
    rows, has_more = page.apply(session, statement, Evaluation)
    return {"data": [EvaluationOut.of(e) for e in rows], "has_more": has_more}


@router.get("/compare", response_model=Comparison)
def compare_evaluations(session: SessionDep, ids: Annotated[str | None, Query(max_length=5000)] = None,
                        corpus_id: IdQuery = None) -> Comparison:
    """One table of checkpoints x metrics: the evaluations named by ids, or the finished ones on corpus_id (the
    newest 100, oldest first)."""
    compared = evaluations.compared(session, ids, corpus_id)
    checkpoints = {c.id: c for c in session.scalars(select(Checkpoint).where(
        Checkpoint.id.in_({e.checkpoint_id for e in compared if e.checkpoint_id})))}
    rows = []
    for e in compared:
        checkpoint = checkpoints.get(e.checkpoint_id)
        rows.append(ComparisonRow(evaluation_id=e.id, status=e.job.status, checkpoint_id=e.checkpoint_id,
                                  checkpoint_step=checkpoint and checkpoint.step,
                                  training_job_id=checkpoint and checkpoint.job_id, corpus_id=e.corpus_id,
                                  kind=e.kind, settings=e.settings, metrics=e.metrics))
    best = evaluations.best_of(rows)
    others = sorted({name for row in rows for name in row.metrics or {}} - best.keys())
    notes = evaluations.differences(rows)
    return Comparison(metrics=[*best, *others], rows=rows, best=best, notes=notes,
                      comparable=not any(note.startswith("the rows differ") for note in notes))


@router.get("/{evaluation_id}", response_model=EvaluationOut)
def get_evaluation(evaluation: EvaluationDep) -> EvaluationOut:
    return EvaluationOut.of(evaluation)


@router.get("/{evaluation_id}/examples", response_model=ExamplePage)
def evaluation_examples(evaluation: EvaluationDep, session: SessionDep,
                        order: Annotated[Literal["worst", "position"], Query()] = "worst",
                        offset: Annotated[int, Query(ge=0, le=2**31)] = 0,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
    """The scored records: classified texts with every class's probability, or answered instructions with
    the reference; the worst first (lowest score), or in corpus order."""
    ordering = (EvaluationExample.score, EvaluationExample.position) if order == "worst" \
        else (EvaluationExample.position,)
    rows = list(session.scalars(select(EvaluationExample).where(EvaluationExample.evaluation_id == evaluation.id)
                                .order_by(*ordering).offset(offset).limit(limit + 1)))
    return {"data": [{"position": r.position, "score": r.score, "data": r.data} for r in rows[:limit]],
            "has_more": len(rows) > limit}


@router.post("/{evaluation_id}/cancel", response_model=EvaluationOut)
def cancel_evaluation(evaluation: EvaluationDep, session: SessionDep) -> EvaluationOut:
    jobs.request_cancel(session, evaluation.job)
    session.commit()
    return EvaluationOut.of(evaluation)
