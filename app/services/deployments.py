"""Deployments: a name pointing at the checkpoint it serves; one of them, while any exist, is the default."""

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.services.jobs import named_row
from core.errors import Conflict, Invalid, NotFound
from core.settings import Settings
from core.tables import Checkpoint, Deployment
from serving.deployments import memory_estimate, over_budget


def by_name(session: Session, name: str) -> Deployment:
    deployment = session.scalar(select(Deployment).where(Deployment.name == name))
    if deployment is None:
        raise NotFound.of("deployment", name)
    return deployment


def _make_default(session: Session, deployment: Deployment) -> None:
    session.execute(update(Deployment).where(Deployment.id != deployment.id).values(is_default=False))
    deployment.is_default = True


def _check_fits(session: Session, name: str, checkpoint: Checkpoint, settings: Settings) -> None:
    """Invalid unless the checkpoint fits the serving memory limit beside every other deployment's."""
    def estimate(model_config: dict, task: str) -> int:
        return memory_estimate(model_config, task, settings.serving_max_batch)

    others = session.execute(select(Checkpoint.model_config, Checkpoint.task)
                             .join(Deployment, Deployment.checkpoint_id == Checkpoint.id)
                             .where(Deployment.name != name)).all()
    refusal = over_budget(checkpoint.id, estimate(checkpoint.model_config, checkpoint.task),
                          sum(estimate(config, task) for config, task in others), settings.max_serving_memory_bytes)
    if refusal is not None:
        raise Invalid(refusal, param="checkpoint_id")


def create(session: Session, name: str, checkpoint_id: str, default: bool, settings: Settings) -> Deployment:
    checkpoint = named_row(session, Checkpoint, checkpoint_id, "checkpoint", "checkpoint_id")
    if session.scalar(select(Deployment.id).where(Deployment.name == name)):
        raise Conflict(f"a deployment named {name!r} exists; PATCH it to switch checkpoints", param="name")
    _check_fits(session, name, checkpoint, settings)
    deployment = Deployment(name=name, checkpoint_id=checkpoint.id)
    session.add(deployment)
    session.flush()
    first = session.scalar(select(Deployment.id).where(Deployment.id != deployment.id).limit(1)) is None
    if default or first:
        _make_default(session, deployment)
    session.commit()
    return deployment


def change(session: Session, name: str, checkpoint_id: str | None, default: bool | None,
           settings: Settings) -> Deployment:
    deployment = by_name(session, name)
    if checkpoint_id is not None:
        checkpoint = named_row(session, Checkpoint, checkpoint_id, "checkpoint", "checkpoint_id")
        _check_fits(session, name, checkpoint, settings)
        deployment.checkpoint_id = checkpoint.id
    if default:
        _make_default(session, deployment)
    elif default is False and deployment.is_default:
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
