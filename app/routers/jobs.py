"""Jobs: create (validated, then queued), list, read, cancel, metrics, events and a live event stream."""

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from app.auth import ReadOrTrain
from app.deps import DatabaseDep, JobDep, PageDep, QueueDep, SessionDep, SettingsDep
from app.errors import QUEUE_UNAVAILABLE
from app.schemas.common import Page
from app.schemas.jobs import EventOut, JobCreate, JobEstimate, JobOut, JobStatusName, JobTypeName, MetricSeries
from app.services.jobs import check_job, create_job, memory_refusal, send_job
from core import jobs
from core.errors import NotFound
from core.tables import Job, JobEvent, Metric
from model.config import PRESETS, GPTConfig

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[ReadOrTrain])
STREAM_POLL_S = 0.5
MAX_INDEX = 2**62  # event ids and steps are 64-bit integers in the database


@router.post("", status_code=201, response_model=JobOut, responses=QUEUE_UNAVAILABLE)
def submit_job(body: JobCreate, session: SessionDep, queue: QueueDep, settings: SettingsDep) -> JobOut:
    job = create_job(session, body, settings.max_training_memory_bytes)
    session.commit()
    send_job(queue, session, job)
    return JobOut.of(job)


@router.post("/estimate", response_model=JobEstimate)
def estimate_job(body: JobCreate, session: SessionDep, settings: SettingsDep) -> JobEstimate:
    """What a job of this request would cost, checked as POST /v1/jobs checks it, without starting it."""
    _, cost = check_job(session, body)
    refusal = memory_refusal(cost, body.hyperparameters.batch_size, settings.max_training_memory_bytes)
    return JobEstimate(parameters=cost.parameters, memory_bytes=cost.memory_bytes,
                       memory_limit_bytes=settings.max_training_memory_bytes, tokens_per_step=cost.tokens_per_step,
                       steps=cost.steps, fits=refusal is None, refusal=refusal)


@router.get("/presets")
def model_presets() -> dict:
    """The model presets a pretraining job may start from, with their family (gpt2, llama, qwen3) and shapes."""
    return {"object": "list", "data": [{"name": name, "family": GPTConfig.preset(name).family, **shape}
                                       for name, shape in PRESETS.items()]}


@router.get("", response_model=Page[JobOut])
def list_jobs(session: SessionDep, page: PageDep, status: Annotated[JobStatusName | None, Query()] = None,
              type: Annotated[JobTypeName | None, Query()] = None) -> dict:
    statement = select(Job)
    if status is not None:
        statement = statement.where(Job.status == status)
    if type is not None:
        statement = statement.where(Job.type == type)
    rows, has_more = page.apply(session, statement, Job)
    return {"data": [JobOut.of(job) for job in rows], "has_more": has_more}


@router.get("/{job_id}", response_model=JobOut)
def get_job(job: JobDep) -> JobOut:
    return JobOut.of(job)


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel(job: JobDep, session: SessionDep) -> JobOut:
    """A queued job never starts; a running one stops at its next step (a training job keeps a checkpoint)."""
    jobs.request_cancel(session, job)
    session.commit()
    return JobOut.of(job)


@router.get("/{job_id}/metrics", response_model=MetricSeries)
def job_metrics(job: JobDep, session: SessionDep, name: Annotated[str, Query(max_length=50)],
                since_step: Annotated[int, Query(ge=0, le=MAX_INDEX)] = 0,
                limit: Annotated[int, Query(ge=1, le=10_000)] = 1000) -> dict:
    """A page of one metric's points by step, from since_step on."""
    rows = session.scalars(select(Metric).where(Metric.job_id == job.id, Metric.name == name,
                                                Metric.step >= since_step).order_by(Metric.step)
                           .limit(limit + 1)).all()
    return {"job_id": job.id, "name": name, "has_more": len(rows) > limit,
            "data": [{"step": m.step, "value": m.value, "time": m.time} for m in rows[:limit]]}


def _events(session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                .order_by(JobEvent.id).limit(limit)))


@router.get("/{job_id}/events", response_model=Page[EventOut])
def job_events(job: JobDep, session: SessionDep, after: Annotated[int, Query(ge=0, le=MAX_INDEX)] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
    """The job's events, oldest first; pass the last id as `after` for the next page."""
    rows = _events(session, job.id, after, limit + 1)
    return {"data": rows[:limit], "has_more": len(rows) > limit}


@router.get("/{job_id}/events/stream")
async def stream_job_events(request: Request, job_id: Annotated[str, Path(max_length=40)], database: DatabaseDep,
                            last_event_id: Annotated[int | None, Header(ge=0, le=MAX_INDEX)] = None
                            ) -> StreamingResponse:
    """Server-sent events: every event of the job as it happens, until the job ends. (No request-scoped
    session: each poll takes a connection for a moment, not for the length of the stream.)"""
    def exists() -> bool:
        with database.session() as session:
            return session.get(Job, job_id) is not None

    if not await run_in_threadpool(exists):
        raise NotFound.of("job", job_id)

    def poll(after: int) -> tuple[list[dict], str]:
        with database.session() as session:
            events = [EventOut.model_validate(e).model_dump(mode="json") for e in _events(session, job_id, after, 500)]
            return events, session.get(Job, job_id).status

    async def follow():
        after = last_event_id or 0
        while not await request.is_disconnected():
            events, status = await run_in_threadpool(poll, after)
            for event in events:
                after = event["id"]
                yield f"id: {after}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
            if not events and status in jobs.FINISHED:
                yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                return
            if not events:
                await asyncio.sleep(STREAM_POLL_S)

    return StreamingResponse(follow(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
