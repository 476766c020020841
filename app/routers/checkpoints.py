"""Checkpoints: list (by job), read, download as one archive, delete, and import Hugging Face GPT-2 weights."""

import json
import shutil
import tarfile
import tempfile
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from safetensors import safe_open
from sqlalchemy import or_, select

from app.auth import ReadOrTrain
from app.db import new_id
from app.deps import CheckpointDep, PageDep, SessionDep, SettingsDep
from app.errors import APIError
from app.models import ACTIVE_JOB_STATUSES, Checkpoint, Deployment, Evaluation, Job
from app.schemas.checkpoints import CheckpointOut
from app.schemas.common import Deleted, Page
from app.uploads import receive_upload
from model import gpt2_tokenizer, import_hf_gpt2, save_checkpoint
from model.config import GPT2_VOCAB_SIZE

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"], dependencies=[ReadOrTrain])


@router.get("", response_model=Page[CheckpointOut])
def list_checkpoints(session: SessionDep, page: PageDep,
                     job_id: Annotated[str | None, Query(max_length=40)] = None) -> dict:
    statement = select(Checkpoint)
    if job_id is not None:
        statement = statement.where(Checkpoint.job_id == job_id)
    rows, has_more = page.apply(session, statement, Checkpoint)
    return {"data": [CheckpointOut.of(c) for c in rows], "has_more": has_more}


@router.get("/{checkpoint_id}", response_model=CheckpointOut)
def get_checkpoint(checkpoint: CheckpointDep) -> CheckpointOut:
    return CheckpointOut.of(checkpoint)


def _directory(settings, checkpoint: Checkpoint) -> Path:
    path = settings.data_dir / checkpoint.path
    if not path.is_dir():
        raise APIError(410, f"the files of checkpoint {checkpoint.id} are missing from the data dir", type_="gone")
    return path


@router.get("/{checkpoint_id}/download")
async def download_checkpoint(checkpoint: CheckpointDep, settings: SettingsDep,
                              background: BackgroundTasks) -> FileResponse:
    """A tar archive of the checkpoint directory (model.safetensors, config.json, training state)."""
    directory = _directory(settings, checkpoint)
    archive = Path(tempfile.mkstemp(suffix=".tar", dir=settings.data_dir)[1])

    def pack() -> None:
        with tarfile.open(archive, "w") as tar:
            tar.add(directory, arcname=checkpoint.id)

    await run_in_threadpool(pack)
    background.add_task(archive.unlink, missing_ok=True)
    return FileResponse(archive, media_type="application/x-tar", filename=f"{checkpoint.id}.tar")


@router.delete("/{checkpoint_id}", response_model=Deleted)
def delete_checkpoint(checkpoint: CheckpointDep, session: SessionDep, settings: SettingsDep) -> dict:
    deployed = session.scalars(select(Deployment.name).where(Deployment.checkpoint_id == checkpoint.id)).all()
    if deployed:
        raise APIError(409, f"checkpoint {checkpoint.id} is deployed as {', '.join(deployed)}",
                       param="checkpoint_id")
    evaluating = select(Evaluation.job_id).where(Evaluation.checkpoint_id == checkpoint.id)
    users = session.scalars(select(Job.id).where(
        Job.status.in_(ACTIVE_JOB_STATUSES),
        or_(Job.base_checkpoint_id == checkpoint.id, Job.id == checkpoint.job_id, Job.id.in_(evaluating)))).all()
    if users:
        raise APIError(409, f"checkpoint {checkpoint.id} is in use by queued or running job(s) {', '.join(users)}",
                       param="checkpoint_id")
    if session.scalars(select(Job.id).where(Job.base_checkpoint_id == checkpoint.id).limit(1)).first():
        raise APIError(409, f"checkpoint {checkpoint.id} is the base of finished jobs; it is kept as their record",
                       param="checkpoint_id")
    session.delete(checkpoint)
    session.commit()
    shutil.rmtree(settings.data_dir / checkpoint.path, ignore_errors=True)
    return {"id": checkpoint.id, "object": "checkpoint"}


def _import(staging: Path):
    """The uploaded model as our GPT; APIError naming the part at fault, never a server path."""
    def refuse(part: str, problem) -> APIError:
        file = "config.json" if part == "config" else "model.safetensors"
        problem = str(problem).replace(str(staging), "<upload>")
        return APIError(422, f"not an importable GPT-2 checkpoint: {file}: {problem}", param=part)

    try:
        with safe_open(staging / "model.safetensors", framework="pt"):
            pass
    except Exception as e:  # whatever safetensors says of a file that is not one
        raise refuse("weights", f"not a safetensors file ({type(e).__name__})") from None
    try:
        config = json.loads((staging / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise refuse("config", f"not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise refuse("config", f"must be a JSON object, not {type(config).__name__}")
    try:
        return import_hf_gpt2(staging)
    except (ValueError, TypeError, KeyError) as e:
        about_tensors = any(word in str(e) for word in ("shape", "missing key", "unexpected key", "tensor"))
        raise refuse("weights" if about_tensors else "config", e) from None


@router.post("/import", status_code=201, response_model=CheckpointOut)
async def import_checkpoint(request: Request, session: SessionDep, settings: SettingsDep) -> CheckpointOut:
    """multipart/form-data with `weights` (model.safetensors) and `config` (config.json) of a Hugging Face
    GPT-2 model, as published; it becomes an `lm` checkpoint with GPT-2's tokenizer."""
    staging = settings.checkpoints_dir / ".staging" / uuid.uuid4().hex
    staging.mkdir(parents=True)
    try:
        await receive_upload(request, {"weights": staging / "model.safetensors", "config": staging / "config.json"},
                             settings.max_upload_bytes)
        model = await run_in_threadpool(_import, staging)
        if model.config.vocab_size != GPT2_VOCAB_SIZE:
            raise APIError(422, f"the model's vocabulary has {model.config.vocab_size} tokens; an imported model "
                                f"must use GPT-2's {GPT2_VOCAB_SIZE}-token tokenizer", param="config")
        checkpoint_id = new_id("ckpt")
        relative = Path("checkpoints") / "imported" / checkpoint_id
        target = settings.data_dir / relative
        await run_in_threadpool(save_checkpoint, target, model, gpt2_tokenizer(), extra={"source": "import"})
        checkpoint = Checkpoint(id=checkpoint_id, step=0, path=str(relative), task="lm", source="import",
                                size_bytes=sum(f.stat().st_size for f in target.iterdir()),
                                model_config=model.config.to_dict(), tokenizer_type="gpt2", metrics={})
        session.add(checkpoint)
        session.commit()
        return CheckpointOut.of(checkpoint)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
