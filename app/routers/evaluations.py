"""Evaluations: score a checkpoint on a corpus as a job, read the numbers and examples, compare checkpoints."""

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app.auth import ReadOrTrain
from app.deps import EvaluationDep, PageDep, SessionDep, SettingsDep
from app.errors import APIError
from app.evaluation_plans import create_evaluation
from app.job_plans import cancel_job, queue_job
from app.models import Checkpoint, Evaluation, EvaluationExample, Job
from app.schemas.common import Page
from app.schemas.evaluations import (
    Comparison,
    ComparisonRow,
    EvaluationCreate,
    EvaluationKind,
    EvaluationOut,
    ExamplePage,
)
from app.schemas.jobs import JobStatus

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"], dependencies=[ReadOrTrain])
IdQuery = Annotated[str | None, Query(max_length=40)]
MAX_COMPARED = 100
# the metrics that rank checkpoints, and which way is better; the others (tokens, bytes, ...) are counts
HIGHER_IS_BETTER = ("accuracy", "macro_f1", "exact_match", "token_f1", "judge_score")
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "response_loss", "response_perplexity")


@router.post("", status_code=201, response_model=EvaluationOut)
def submit_evaluation(request: Request, body: EvaluationCreate, session: SessionDep,
                      settings: SettingsDep) -> EvaluationOut:
    evaluation = create_evaluation(session, body)
    session.commit()
    queue_job(request.app.state.celery, settings, session, evaluation.job)
    return EvaluationOut.of(evaluation)


@router.get("", response_model=Page[EvaluationOut])
def list_evaluations(session: SessionDep, page: PageDep, checkpoint_id: IdQuery = None, corpus_id: IdQuery = None,
                     training_job_id: Annotated[str | None, Query(
                         max_length=40, description="evaluations of this training job's checkpoints")] = None,
                     job_id: Annotated[str | None, Query(max_length=40, description="the evaluate job")] = None,
                     kind: Annotated[EvaluationKind | None, Query()] = None,
                     status: Annotated[JobStatus | None, Query()] = None) -> dict:
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


def _compared(session, ids: str | None, corpus_id: str | None) -> list[Evaluation]:
    if (ids is None) == (corpus_id is None):
        raise APIError(422, "pass either ids (comma-separated evaluation ids) or corpus_id", param="ids")
    statement = select(Evaluation).options(selectinload(Evaluation.job))
    if corpus_id is not None:
        newest = list(session.scalars(statement.join(Evaluation.job).where(
            Evaluation.corpus_id == corpus_id, Job.status == "succeeded").order_by(Evaluation.id.desc())
            .limit(MAX_COMPARED)))
        if not newest:
            raise APIError(404, f"no finished evaluation on corpus {corpus_id}", param="corpus_id")
        return newest[::-1]
    wanted = list(dict.fromkeys(part.strip() for part in ids.split(",") if part.strip()))
    if not wanted or len(wanted) > MAX_COMPARED:
        raise APIError(422, f"ids must name between 1 and {MAX_COMPARED} evaluations", param="ids")
    found = {e.id: e for e in session.scalars(statement.where(Evaluation.id.in_(wanted)))}
    missing = [i for i in wanted if i not in found]
    if missing:
        raise APIError(404, f"no evaluation with id(s) {', '.join(missing)}", param="ids")
    return [found[i] for i in wanted]


def _best(rows: list[ComparisonRow]) -> dict[str, str]:
    best = {}
    for name in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER):
        scored = [(row.metrics[name], row.evaluation_id) for row in rows
                  if row.metrics and row.metrics.get(name) is not None]
        if scored:
            pick = max if name in HIGHER_IS_BETTER else min
            best[name] = pick(scored, key=lambda pair: pair[0])[1]
    return best


def _differences(rows: list[ComparisonRow]) -> list[str]:
    notes = []
    for field in ("corpus_id", "kind"):
        values = sorted({getattr(row, field) for row in rows})
        if len(values) > 1:
            notes.append(f"the rows differ in {field}: {', '.join(values)}")
    for name in sorted({name for row in rows for name in row.settings}):
        values = {repr(row.settings.get(name)) for row in rows}
        if len(values) > 1:
            notes.append(f"the rows differ in the setting {name}: {', '.join(sorted(values))}")
    unfinished = [row.evaluation_id for row in rows if row.metrics is None]
    if unfinished:
        notes.append(f"no numbers yet (not succeeded): {', '.join(unfinished)}")
    return notes


@router.get("/compare", response_model=Comparison)
def compare_evaluations(session: SessionDep, ids: Annotated[str | None, Query(max_length=5000)] = None,
                        corpus_id: IdQuery = None) -> Comparison:
    """One table of checkpoints x metrics: the evaluations named by ids, or the finished ones on corpus_id (the
    newest 100, oldest first)."""
    evaluations = _compared(session, ids, corpus_id)
    checkpoints = {c.id: c for c in session.scalars(select(Checkpoint).where(
        Checkpoint.id.in_({e.checkpoint_id for e in evaluations if e.checkpoint_id})))}
    rows = []
    for e in evaluations:
        checkpoint = checkpoints.get(e.checkpoint_id)
        rows.append(ComparisonRow(evaluation_id=e.id, status=e.job.status, checkpoint_id=e.checkpoint_id,
                                  checkpoint_step=checkpoint and checkpoint.step,
                                  training_job_id=checkpoint and checkpoint.job_id, corpus_id=e.corpus_id,
                                  kind=e.kind, settings=e.settings, metrics=e.metrics))
    best = _best(rows)
    others = sorted({name for row in rows for name in row.metrics or {}} - best.keys())
    notes = _differences(rows)
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
    cancel_job(session, evaluation.job)
    return EvaluationOut.of(evaluation)
