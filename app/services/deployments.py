"""Deployments: a name pointing at the checkpoint it serves; one of them, while any exist, is the default."""

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.schemas.deployments import DeploymentCreate, DeploymentUpdate
from app.services.jobs import named_row
from core.errors import Conflict, Invalid, NotFound
from core.settings import Settings
from core.tables import Checkpoint, Deployment
from serving.deployments import memory_estimate, over_budget
from serving.placement import Budget, Placement, PlacementError, resolve


def by_name(session: Session, name: str) -> Deployment:
    deployment = session.scalar(select(Deployment).where(Deployment.name == name))
    if deployment is None:
        raise NotFound.of("deployment", name)
    return deployment


def _make_default(session: Session, deployment: Deployment) -> None:
    session.execute(update(Deployment).where(Deployment.id != deployment.id).values(is_default=False))
    deployment.is_default = True


def _check_fits(session: Session, name: str, checkpoint: Checkpoint, device: str, dtype: str,
                settings: Settings) -> None:
    """Invalid unless this API process has the device, and the checkpoint fits its memory limit beside every
    other deployment this process would serve on that device."""
    try:
        placement = resolve(device, dtype)
    except PlacementError as e:
        raise Invalid(str(e), param="device") from None

    def estimate(model_config: dict, task: str, where: Placement) -> int:
        return memory_estimate(model_config, task, settings.serving_max_batch, where)

    others = 0
    for model_config, task, other_device, other_dtype in session.execute(
            select(Checkpoint.model_config, Checkpoint.task, Deployment.device, Deployment.dtype)
            .join(Deployment, Deployment.checkpoint_id == Checkpoint.id).where(Deployment.name != name)):
        try:
            other = resolve(other_device, other_dtype)
        except PlacementError:  # not served by this process at all
            continue
        if other.device == placement.device:
            others += estimate(model_config, task, other)
    budget = Budget.of(placement, settings.max_serving_memory_bytes, settings.serving_gpu_memory_fraction)
    refusal = over_budget(checkpoint.id, placement, estimate(checkpoint.model_config, checkpoint.task, placement),
                          others, budget)
    if refusal is not None:
        raise Invalid(refusal, param="checkpoint_id")


def create(session: Session, request: DeploymentCreate, settings: Settings) -> Deployment:
    checkpoint = named_row(session, Checkpoint, request.checkpoint_id, "checkpoint", "checkpoint_id")
    if session.scalar(select(Deployment.id).where(Deployment.name == request.name)):
        raise Conflict(f"a deployment named {request.name!r} exists; PATCH it to switch checkpoints", param="name")
    _check_fits(session, request.name, checkpoint, request.device, request.dtype, settings)
    deployment = Deployment(name=request.name, checkpoint_id=checkpoint.id, device=request.device,
                            dtype=request.dtype)
    session.add(deployment)
    session.flush()
    first = session.scalar(select(Deployment.id).where(Deployment.id != deployment.id).limit(1)) is None
    if request.default or first:
        _make_default(session, deployment)
    session.commit()
    return deployment


def change(session: Session, name: str, request: DeploymentUpdate, settings: Settings) -> Deployment:
    """Switch what a deployment serves (checkpoint, device, dtype: each kept unless given) or make it the
    default."""
    deployment = by_name(session, name)
    checkpoint_id = request.checkpoint_id or deployment.checkpoint_id
    device, dtype = request.device or deployment.device, request.dtype or deployment.dtype
    if (checkpoint_id, device, dtype) != (deployment.checkpoint_id, deployment.device, deployment.dtype):
        checkpoint = named_row(session, Checkpoint, checkpoint_id, "checkpoint", "checkpoint_id")
        _check_fits(session, name, checkpoint, device, dtype, settings)
        deployment.checkpoint_id, deployment.device, deployment.dtype = checkpoint.id, device, dtype
    if request.default:
        _make_default(session, deployment)
    elif request.default is False and deployment.is_default:
        raise Invalid("one deployment is always the default: make another one the default instead",
                      param="default")
    session.commit()
    return deployment


def remove(session: Session, name: str) -> Deployment:
    """Delete the deployment; if it was the default, the newest remaining one becomes the default."""
    deployment = by_name(session, name)
    session.delete(deployment)
    session.flush()
    if deployment.is_default:
        successor = session.scalar(select(Deployment).order_by(Deployment.id.desc()).limit(1))
        if successor is not None:
            successor.is_default = True
    session.commit()
    return deployment
