"""Deployments: a name pointing at the checkpoint it serves; one of them is the default."""

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from app.auth import Deployer, ReadOrTrain
from app.deps import DeploymentsDep, PageDep, SessionDep, SettingsDep
from app.schemas.common import Deleted, Page
from app.schemas.deployments import DeploymentCreate, DeploymentOut, DeploymentUpdate
from app.services import deployments
from core.tables import Checkpoint, Deployment
from serving.deployments import DeploymentManager, DeploymentState

router = APIRouter(prefix="/v1/deployments", tags=["deployments"], dependencies=[ReadOrTrain])


def _out(manager: DeploymentManager, deployment: Deployment, task: str) -> DeploymentOut:
    served = manager.get(deployment.name)
    current = served.current if served else None
    return DeploymentOut(id=deployment.id, name=deployment.name, checkpoint_id=deployment.checkpoint_id,
                         serving_checkpoint_id=current.checkpoint_id if current else None, task=task,
                         default=deployment.is_default, device=deployment.device, dtype=deployment.dtype,
                         served_device=str(current.placement.device) if current else None,
                         served_dtype=current.placement.dtype_name if current else None,
                         adapters={a.name: a.checkpoint_id for a in deployment.adapters},
                         serving_adapters={name: a.checkpoint_id for name, a in current.adapters.items()}
                         if current else None,
                         state=served.state if served else DeploymentState.LOADING,
                         error=served.error if served else None,
                         created_at=deployment.created_at, updated_at=deployment.updated_at)


def _task(session, deployment: Deployment) -> str:
    return session.get(Checkpoint, deployment.checkpoint_id).task


@router.post("", status_code=201, response_model=DeploymentOut, dependencies=[Deployer])
def create_deployment(body: DeploymentCreate, session: SessionDep, manager: DeploymentsDep,
                      settings: SettingsDep) -> DeploymentOut:
    deployment = deployments.create(session, body, settings)
    manager.sync()
    return _out(manager, deployment, _task(session, deployment))


@router.get("", response_model=Page[DeploymentOut])
def list_deployments(session: SessionDep, page: PageDep, manager: DeploymentsDep) -> dict:
    rows, has_more = page.apply(session, select(Deployment).options(selectinload(Deployment.adapters)), Deployment)
    tasks = dict(session.execute(select(Checkpoint.id, Checkpoint.task).where(
        Checkpoint.id.in_([d.checkpoint_id for d in rows]))).all())
    return {"data": [_out(manager, d, tasks[d.checkpoint_id]) for d in rows], "has_more": has_more}


@router.get("/{name}", response_model=DeploymentOut)
def get_deployment(name: str, session: SessionDep, manager: DeploymentsDep) -> DeploymentOut:
    deployment = deployments.by_name(session, name)
    return _out(manager, deployment, _task(session, deployment))


@router.patch("/{name}", response_model=DeploymentOut, dependencies=[Deployer])
def update_deployment(name: str, body: DeploymentUpdate, session: SessionDep,
                      manager: DeploymentsDep, settings: SettingsDep) -> DeploymentOut:
    deployment = deployments.change(session, name, body, settings)
    manager.sync()
    return _out(manager, deployment, _task(session, deployment))


@router.delete("/{name}", response_model=Deleted, dependencies=[Deployer])
def delete_deployment(name: str, session: SessionDep, manager: DeploymentsDep) -> dict:
    deployment = deployments.remove(session, name)
    manager.sync()
    return {"id": deployment.id, "object": "deployment"}
