"""Deployments: a name pointing at the checkpoint it serves; one of them is the default."""

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select, update

from app.auth import ReadOrTrain
from app.deps import PageDep, SessionDep
from app.errors import APIError, not_found
from app.models import Checkpoint, Deployment
from app.schemas.common import Deleted, Page
from app.schemas.deployments import DeploymentCreate, DeploymentOut, DeploymentUpdate

router = APIRouter(prefix="/v1/deployments", tags=["deployments"], dependencies=[ReadOrTrain])


def _out(request: Request, deployment: Deployment, task: str) -> DeploymentOut:
    served = request.app.state.deployments.get(deployment.name)
    serving = served.current.checkpoint_id if served and served.current else None
    return DeploymentOut(id=deployment.id, name=deployment.name, checkpoint_id=deployment.checkpoint_id,
                         serving_checkpoint_id=serving, task=task, default=deployment.is_default,
                         state=served.state if served else "loading", error=served.error if served else None,
                         created_at=deployment.created_at, updated_at=deployment.updated_at)


def _checkpoint(session, checkpoint_id: str) -> Checkpoint:
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise APIError(422, f"no checkpoint with id {checkpoint_id!r}", param="checkpoint_id")
    return checkpoint


def _by_name(session, name: str) -> Deployment:
    deployment = session.scalar(select(Deployment).where(Deployment.name == name))
    if deployment is None:
        raise not_found("deployment", name)
    return deployment


def _make_default(session, deployment: Deployment) -> None:
    session.execute(update(Deployment).where(Deployment.id != deployment.id).values(is_default=False))
    deployment.is_default = True


async def _apply(request: Request) -> None:
    await run_in_threadpool(request.app.state.deployments.sync)


@router.post("", status_code=201, response_model=DeploymentOut)
async def create_deployment(request: Request, body: DeploymentCreate, session: SessionDep) -> DeploymentOut:
    checkpoint = _checkpoint(session, body.checkpoint_id)
    if session.scalar(select(Deployment.id).where(Deployment.name == body.name)):
        raise APIError(409, f"a deployment named {body.name!r} exists; PATCH it to switch checkpoints", param="name")
    deployment = Deployment(name=body.name, checkpoint_id=checkpoint.id)
    session.add(deployment)
    session.flush()
    first = session.scalar(select(Deployment.id).where(Deployment.id != deployment.id).limit(1)) is None
    if body.default or first:
        _make_default(session, deployment)
    session.commit()
    await _apply(request)
    return _out(request, deployment, checkpoint.task)


@router.get("", response_model=Page[DeploymentOut])
def list_deployments(request: Request, session: SessionDep, page: PageDep) -> dict:
    rows, has_more = page.apply(session, select(Deployment), Deployment)
    tasks = dict(session.execute(select(Checkpoint.id, Checkpoint.task).where(
        Checkpoint.id.in_([d.checkpoint_id for d in rows]))).all())
    return {"data": [_out(request, d, tasks[d.checkpoint_id]) for d in rows], "has_more": has_more}


@router.get("/{name}", response_model=DeploymentOut)
def get_deployment(request: Request, name: str, session: SessionDep) -> DeploymentOut:
    deployment = _by_name(session, name)
    return _out(request, deployment, session.get(Checkpoint, deployment.checkpoint_id).task)


@router.patch("/{name}", response_model=DeploymentOut)
async def update_deployment(request: Request, name: str, body: DeploymentUpdate,
                            session: SessionDep) -> DeploymentOut:
    deployment = _by_name(session, name)
    if body.checkpoint_id is not None:
        deployment.checkpoint_id = _checkpoint(session, body.checkpoint_id).id
    if body.default:
        _make_default(session, deployment)
    elif body.default is False and deployment.is_default:
        raise APIError(422, "one deployment is always the default: make another one the default instead",
                       param="default")
    session.commit()
    await _apply(request)
    return _out(request, deployment, session.get(Checkpoint, deployment.checkpoint_id).task)


@router.delete("/{name}", response_model=Deleted)
async def delete_deployment(request: Request, name: str, session: SessionDep) -> dict:
    deployment = _by_name(session, name)
    session.delete(deployment)
    session.flush()
    if deployment.is_default:
        successor = session.scalar(select(Deployment).order_by(Deployment.id.desc()).limit(1))
        if successor is not None:
            successor.is_default = True
    session.commit()
    await _apply(request)
    return {"id": deployment.id, "object": "deployment"}
