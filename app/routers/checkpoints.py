"""Checkpoints: list (by job), read, download as one archive, delete, and import Hugging Face GPT-2 weights."""

import json
import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from safetensors import safe_open
from sqlalchemy import select

from app.auth import Deployer, ReadOrTrain
from app.deps import CheckpointDep, DatabaseDep, PageDep, SessionDep, SettingsDep, StorageDep
from app.schemas.checkpoints import CheckpointOut
from app.schemas.common import Deleted, Page
from app.tar_stream import TarStream
from app.uploads import receive_upload
from core import checkpoints
from core.checkpoints import register_checkpoint
from core.db import new_id
from core.enums import CheckpointSource
from core.errors import Gone, Invalid
from core.storage import DataDir
from core.tables import Checkpoint
from model import gpt2_tokenizer, import_hf_gpt2, read_metadata, save_checkpoint
from model.config import GPT2_VOCAB_SIZE
from model.json_text import parse_json

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


def _directory(storage: DataDir, checkpoint: Checkpoint) -> Path:
    path = storage.checkpoint_dir(checkpoint.path)
    if not path.is_dir():
        raise Gone(f"the files of checkpoint {checkpoint.id} are missing from the data dir")
    return path


@router.get("/{checkpoint_id}/download", response_class=StreamingResponse)
def download_checkpoint(checkpoint: CheckpointDep, storage: StorageDep) -> StreamingResponse:
    """A tar archive of the checkpoint directory (model.safetensors, config.json, training state), made as it
    is sent."""
    archive = TarStream(_directory(storage, checkpoint), checkpoint.id)
    return StreamingResponse(archive, media_type="application/x-tar", headers={
        "Content-Length": str(archive.size),
        "Content-Disposition": f'attachment; filename="{checkpoint.id}.tar"'})


@router.delete("/{checkpoint_id}", response_model=Deleted, dependencies=[Deployer])
def delete_checkpoint(checkpoint: CheckpointDep, session: SessionDep, storage: StorageDep) -> dict:
    checkpoints.delete_checkpoint(session, storage, checkpoint)
    return {"id": checkpoint.id, "object": "checkpoint"}


def _import(staging: Path):
    """The uploaded model as our GPT; Invalid naming the part at fault, never a server path."""
    def refuse(part: str, problem) -> Invalid:
        file = "config.json" if part == "config" else "model.safetensors"
        problem = str(problem).replace(str(staging), "<upload>")
        return Invalid(f"not an importable GPT-2 checkpoint: {file}: {problem}", param=part)

    try:
        with safe_open(staging / "model.safetensors", framework="pt"):
            pass
    except Exception as e:  # whatever safetensors says of a file that is not one
        raise refuse("weights", f"not a safetensors file ({type(e).__name__})") from None
    try:
        config = parse_json((staging / "config.json").read_text(encoding="utf-8"))
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
async def import_checkpoint(request: Request, database: DatabaseDep, settings: SettingsDep) -> CheckpointOut:
    """multipart/form-data with `weights` (model.safetensors) and `config` (config.json) of a Hugging Face
    GPT-2 model, as published; it becomes an `lm` checkpoint with GPT-2's tokenizer."""
    storage = settings.storage
    staging = storage.staging_path(storage.checkpoints)
    staging.mkdir()

    def keep() -> CheckpointOut:
        model = _import(staging)
        if model.config.vocab_size != GPT2_VOCAB_SIZE:
            raise Invalid(f"the model's vocabulary has {model.config.vocab_size} tokens; an imported model "
                          f"must use GPT-2's {GPT2_VOCAB_SIZE}-token tokenizer", param="config")
        checkpoint_id = new_id("ckpt")
        target = save_checkpoint(storage.imported_checkpoint_dir(checkpoint_id), model, gpt2_tokenizer(),
                                 extra={"source": CheckpointSource.IMPORT})
        with database.session() as session:
            checkpoint = register_checkpoint(session, storage, target, read_metadata(target),
                                             checkpoint_id=checkpoint_id)
            return CheckpointOut.of(checkpoint)

    try:
        await receive_upload(request, {"weights": staging / "model.safetensors", "config": staging / "config.json"},
                             settings.max_upload_bytes)
        return await run_in_threadpool(keep)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
