"""Deployments: a name pointing at the checkpoint it serves; one of them, while any exist, is the default."""

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.schemas.deployments import DeploymentCreate, DeploymentUpdate
from app.services.jobs import named_row
from core.errors import Conflict, Invalid, NotFound
from core.settings import Settings
from core.tables import Checkpoint, Deployment, DeploymentAdapter
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


def _adapters(session: Session, checkpoint: Checkpoint, adapters: dict[str, str]) -> list[DeploymentAdapter]:
    """The rows of the adapters asked for over checkpoint; Invalid names one that is not an adapter of it."""
    rows = []
    for name, adapter_id in adapters.items():
        param = f"adapters.{name}"
        adapter = named_row(session, Checkpoint, adapter_id, "checkpoint", param)
        if adapter.adapter_of_id is None:
            raise Invalid(f"checkpoint {adapter.id} is not adapter-only: an adapter comes from a finetune_instruct "
                          f"job with lora and adapter_only", param=param)
        if adapter.adapter_of_id != checkpoint.id:
            raise Invalid(f"adapter {name} (checkpoint {adapter.id}) was trained over checkpoint "
                          f"{adapter.adapter_of_id}, not over checkpoint {checkpoint.id} that the deployment serves",
                          param=param)
        rows.append(DeploymentAdapter(name=name, checkpoint_id=adapter.id))
    return rows


def _check_fits(session: Session, name: str, checkpoint: Checkpoint, device: str, dtype: str,
                adapters: list[DeploymentAdapter], settings: Settings) -> None:
    """Invalid unless this API process has the device, and the checkpoint (and its adapters) fits its memory limit
    beside every other deployment this process would serve on that device."""
    try:
        placement = resolve(device, dtype)
    except PlacementError as e:
        raise Invalid(str(e), param="device") from None

    def estimate(model_config: dict, task: str, where: Placement, adapter_bytes: int) -> int:
        return memory_estimate(model_config, task, settings.serving_max_batch, where, adapter_bytes)

    adapter_bytes = dict(session.execute(
        select(DeploymentAdapter.deployment_id, func.sum(Checkpoint.size_bytes))
        .join(Checkpoint, Checkpoint.id == DeploymentAdapter.checkpoint_id).group_by(DeploymentAdapter.deployment_id)
    ).all())
    others = 0
    for deployment_id, model_config, task, other_device, other_dtype in session.execute(
            select(Deployment.id, Checkpoint.model_config, Checkpoint.task, Deployment.device, Deployment.dtype)
            .join(Deployment, Deployment.checkpoint_id == Checkpoint.id).where(Deployment.name != name)):
        try:
            other = resolve(other_device, other_dtype)
        except PlacementError:  # not served by this process at all
            continue
        if other.device == placement.device:
            others += estimate(model_config, task, other, adapter_bytes.get(deployment_id, 0))
    own_adapters = sum(session.get(Checkpoint, a.checkpoint_id).size_bytes for a in adapters)
    budget = Budget.of(placement, settings.max_serving_memory_bytes, settings.serving_gpu_memory_fraction)
    refusal = over_budget(checkpoint.id, placement,
                          estimate(checkpoint.model_config, checkpoint.task, placement, own_adapters), others, budget)
    if refusal is not None:
        raise Invalid(refusal, param="checkpoint_id")


def create(session: Session, request: DeploymentCreate, settings: Settings) -> Deployment:
    checkpoint = named_row(session, Checkpoint, request.checkpoint_id, "checkpoint", "checkpoint_id")
    if session.scalar(select(Deployment.id).where(Deployment.name == request.name)):
        raise Conflict(f"a deployment named {request.name!r} exists; PATCH it to switch checkpoints", param="name")
    adapters = _adapters(session, checkpoint, request.adapters)
    _check_fits(session, request.name, checkpoint, request.device, request.dtype, adapters, settings)
    deployment = Deployment(name=request.name, checkpoint_id=checkpoint.id, device=request.device,
                            dtype=request.dtype, adapters=adapters)
    session.add(deployment)
    session.flush()
    first = session.scalar(select(Deployment.id).where(Deployment.id != deployment.id).limit(1)) is None
    if request.default or first:
        _make_default(session, deployment)
    session.commit()
    return deployment


def change(session: Session, name: str, request: DeploymentUpdate, settings: Settings) -> Deployment:
    """Switch what a deployment serves (checkpoint, device, dtype, adapters: each kept unless given) or make it
    the default."""
    deployment = by_name(session, name)
    checkpoint_id = request.checkpoint_id or deployment.checkpoint_id
    device, dtype = request.device or deployment.device, request.dtype or deployment.dtype
    kept = {a.name: a.checkpoint_id for a in deployment.adapters}
    asked = kept if request.adapters is None else request.adapters
    if (checkpoint_id, device, dtype, asked) != (deployment.checkpoint_id, deployment.device, deployment.dtype, kept):
        checkpoint = named_row(session, Checkpoint, checkpoint_id, "checkpoint", "checkpoint_id")
        try:
            adapters = _adapters(session, checkpoint, asked)
        except Invalid as e:
            if request.adapters is None:  # the checkpoint changed under the adapters it had
                raise Invalid(f"{e.message}; send adapters with the new checkpoint ({{}} to drop them)",
                              param="adapters") from None
            raise
        _check_fits(session, name, checkpoint, device, dtype, adapters, settings)
        deployment.checkpoint_id, deployment.device, deployment.dtype = checkpoint.id, device, dtype
        if asked != kept:
            deployment.adapters.clear()
            session.flush()  # the old rows go before new ones of the same names come
            deployment.adapters.extend(adapters)
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
