"""The checkpoint registry: the database's index of checkpoint directories.

A checkpoint's own metadata (config.json, as model.read_metadata returns it) is the truth: task, labels,
prompt format, tokenizer, architecture, step and metrics. The row is made from it, here and nowhere else,
for a training job's checkpoints, imported weights and the tests' and benchmarks' models alike.
"""

import shutil
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from core.enums import CheckpointSource
from core.errors import Conflict
from core.jobs import ACTIVE
from core.storage import DataDir
from core.tables import Checkpoint, Deployment, DeploymentAdapter, Evaluation, Job


def register_checkpoint(session: Session, storage: DataDir, directory: Path, meta: dict, *,
                        job_id: str | None = None, checkpoint_id: str | None = None) -> Checkpoint:
    """Add the row of the checkpoint in directory (inside the data dir) whose metadata is meta."""
    checkpoint = Checkpoint(id=checkpoint_id, job_id=job_id, step=meta.get("step", 0), path=storage.relative(directory),
                            size_bytes=directory_bytes(directory), task=meta["task"],
                            label_names=meta.get("label_names"), metrics=dict(meta.get("metrics") or {}),
                            model_config=meta["model"], tokenizer_type=meta["tokenizer"]["type"],
                            prompt_format=meta.get("prompt_format"), parent_id=meta.get("parent"),
                            source=meta.get("source", CheckpointSource.TRAINING),
                            adapter_of_id=meta.get("parent") if meta.get("adapter_of") else None)
    session.add(checkpoint)
    session.flush()
    return checkpoint


def base_dir(session: Session, storage: DataDir, checkpoint: Checkpoint) -> Path | None:
    """The directory of the checkpoint an adapter-only checkpoint is loaded over; None for a full checkpoint."""
    if checkpoint.adapter_of_id is None:
        return None
    return storage.checkpoint_dir(session.get(Checkpoint, checkpoint.adapter_of_id).path)


def _in_use(session: Session, checkpoint: Checkpoint, by_its_job: bool = True) -> Conflict | None:
    """What keeps the checkpoint, as the Conflict that names it; None when nothing does. by_its_job: a checkpoint
    of a queued or running job is that job's (false for the job's own retention)."""
    deployed = session.scalars(select(Deployment.name).where(Deployment.checkpoint_id == checkpoint.id)).all()
    if deployed:
        return Conflict(f"checkpoint {checkpoint.id} is deployed as {', '.join(deployed)}", param="checkpoint_id")
    serving_adapter = session.scalars(select(Deployment.name).join(DeploymentAdapter).where(
        DeploymentAdapter.checkpoint_id == checkpoint.id)).all()
    if serving_adapter:
        return Conflict(f"checkpoint {checkpoint.id} is an adapter of deployment(s) {', '.join(serving_adapter)}",
                        param="checkpoint_id")
    adapters = session.scalars(select(Checkpoint.id).where(Checkpoint.adapter_of_id == checkpoint.id)).all()
    if adapters:
        return Conflict(f"checkpoint {checkpoint.id} holds the weights adapter-only checkpoint(s) "
                        f"{', '.join(adapters)} are loaded over: delete them first", param="checkpoint_id")
    evaluating = select(Evaluation.job_id).where(Evaluation.checkpoint_id == checkpoint.id)
    its_job = [Job.id == checkpoint.job_id] if by_its_job else []
    users = session.scalars(select(Job.id).where(
        Job.status.in_(ACTIVE), or_(Job.base_checkpoint_id == checkpoint.id, Job.id.in_(evaluating), *its_job))).all()
    if users:
        return Conflict(f"checkpoint {checkpoint.id} is in use by queued or running job(s) {', '.join(users)}",
                        param="checkpoint_id")
    if session.scalars(select(Job.id).where(Job.base_checkpoint_id == checkpoint.id).limit(1)).first():
        return Conflict(f"checkpoint {checkpoint.id} is the base of finished jobs; it is kept as their record",
                        param="checkpoint_id")
    return None


def _delete(session: Session, storage: DataDir, checkpoints: list[Checkpoint]) -> None:
    for checkpoint in checkpoints:
        session.delete(checkpoint)
    session.commit()
    for checkpoint in checkpoints:  # once no row points at them
        shutil.rmtree(storage.checkpoint_dir(checkpoint.path), ignore_errors=True)


def delete_checkpoint(session: Session, storage: DataDir, checkpoint: Checkpoint) -> None:
    """Remove an unused checkpoint's row and files; Conflict names what still uses it."""
    if (conflict := _in_use(session, checkpoint)) is not None:
        raise conflict
    _delete(session, storage, [checkpoint])


def checkpoints_to_keep(spec: dict, default: int) -> int:
    """How many of its newest checkpoints a training job keeps (0: all): its own keep_checkpoints, or default."""
    kept = spec.get("keep_checkpoints")
    return default if kept is None else kept


def retain(session: Session, storage: DataDir, job_id: str, keep: int) -> list[Checkpoint]:
    """Delete the job's checkpoints past its newest `keep` (0: none) but its best by validation loss and those
    something else uses; returns the older checkpoints kept, whose training state only a resume would read (it
    resumes from the newest)."""
    newest_first = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)
                                   .order_by(Checkpoint.step.desc())).all()
    scored = [c for c in newest_first if "val_loss" in c.metrics]
    best = min(scored, key=lambda c: c.metrics["val_loss"]) if scored else None
    past = newest_first[keep:] if keep else []
    doomed = [c for c in past if c is not best and _in_use(session, c, by_its_job=False) is None]
    _delete(session, storage, doomed)
    return [c for c in newest_first[1:] if c not in doomed]


def refresh_size(storage: DataDir, checkpoint: Checkpoint) -> None:
    checkpoint.size_bytes = directory_bytes(storage.checkpoint_dir(checkpoint.path))


def directory_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir())
