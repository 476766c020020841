"""Checkpoints: list (by job), read, download as one archive, export for Hugging Face transformers, delete, and
import Hugging Face GPT-2, Llama and Qwen3 models with their tokenizers."""

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Literal

from anyio import CancelScope
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import iterate_in_threadpool, run_in_threadpool
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
from core.checkpoints import base_dir, register_checkpoint
from core.db import new_id
from core.enums import CheckpointSource
from core.errors import Gone, Invalid
from core.storage import DataDir
from core.tables import Checkpoint
from model import (
    GPT,
    Tokenizer,
    export_hf_gpt2,
    export_hf_llama,
    gpt2_tokenizer,
    import_hf_gpt2,
    import_hf_llama,
    load_checkpoint,
    merge_lora,
    read_metadata,
    save_checkpoint,
)
from model.checkpoint import CheckpointError
from model.hf_llama import ARCHITECTURES
from model.json_text import parse_json
from model.tokenizer_json import imported_tokenizer

IMPORT_FILES = {"weights": "model.safetensors", "config": "config.json", "tokenizer": "tokenizer.json"}
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


def _export_hf(source: Path, base: Path | None, target: Path) -> None:
    """The checkpoint at source (over base, for an adapter-only one) written to target as a Hugging Face GPT-2
    directory; Invalid says why it cannot be."""
    try:
        model, tokenizer, _ = load_checkpoint(source, base=base)
    except CheckpointError as e:
        raise Gone(f"the files of the checkpoint cannot be read: {e}") from None
    try:
        model = merge_lora(model)
        exporter = export_hf_gpt2 if model.config.family == "gpt2" else export_hf_llama
        exporter(model, target, tokenizer)
    except ValueError as e:
        raise Invalid(f"the checkpoint cannot be exported as a Hugging Face model: {e}",
                      param="checkpoint_id") from None


async def _removed_after(archive: TarStream, directory: Path) -> AsyncIterator[bytes]:
    """The archive's chunks, read in the threadpool; then directory is removed, also when the client leaves
    mid-archive (Starlette may skip a response's background task then, but this generator is always closed)."""
    chunks = iter(archive)
    try:
        async for chunk in iterate_in_threadpool(chunks):
            yield chunk
    finally:
        chunks.close()  # it may hold a file open mid-archive
        with CancelScope(shield=True):  # a disconnect cancels the stream, not its cleanup
            await run_in_threadpool(shutil.rmtree, directory, ignore_errors=True)


@router.get("/{checkpoint_id}/export", response_class=StreamingResponse)
async def export_checkpoint(checkpoint: CheckpointDep, session: SessionDep, storage: StorageDep,
                            format_: Annotated[Literal["hf"], Query(
                                alias="format", description="`hf`: a Hugging Face transformers directory")]
                            ) -> StreamingResponse:
    """A tar archive of the checkpoint as a Hugging Face transformers directory (model.safetensors, config.json,
    generation_config.json, and the tokenizer's vocab.json, merges.txt and tokenizer_config.json, or the
    tokenizer.json it was imported with) that AutoModelForCausalLM (GPT-2, or Llama and Qwen3 for those families)
    and AutoTokenizer load with from_pretrained, LoRA adapters merged into the weights. 422 naming the reason for a
    checkpoint those cannot express: a classifier, a GPT-2 without biases, a tokenizer with its own regex."""
    source = _directory(storage, checkpoint)
    base = await run_in_threadpool(base_dir, session, storage, checkpoint)
    target = storage.staging_path(storage.checkpoints)
    try:
        await run_in_threadpool(_export_hf, source, base, target)
        archive = TarStream(target, f"{checkpoint.id}-hf")
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return StreamingResponse(_removed_after(archive, target), media_type="application/x-tar", headers={
        "Content-Length": str(archive.size),
        "Content-Disposition": f'attachment; filename="{checkpoint.id}-hf.tar"'})


@router.delete("/{checkpoint_id}", response_model=Deleted, dependencies=[Deployer])
def delete_checkpoint(checkpoint: CheckpointDep, session: SessionDep, storage: StorageDep) -> dict:
    checkpoints.delete_checkpoint(session, storage, checkpoint)
    return {"id": checkpoint.id, "object": "checkpoint"}


def _import(staging: Path) -> tuple[GPT, Tokenizer]:
    """The uploaded model as our GPT, with its tokenizer: the uploaded tokenizer.json's, or GPT-2's without one;
    Invalid naming the part at fault, never a server path."""
    def refuse(part: str, problem) -> Invalid:
        file = IMPORT_FILES[part]
        problem = str(problem).replace(str(staging), "<upload>")
        return Invalid(f"not an importable GPT-2, Llama or Qwen3 checkpoint: {file}: {problem}", param=part)

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
        model = import_hf_llama(staging) if config.get("model_type") in ARCHITECTURES else import_hf_gpt2(staging)
    except (ValueError, TypeError, KeyError) as e:
        about_tensors = any(word in str(e) for word in ("shape", "missing key", "unexpected key", "tensor"))
        raise refuse("weights" if about_tensors else "config", e) from None
    tokenizer_file = staging / IMPORT_FILES["tokenizer"]
    if not tokenizer_file.exists():
        tokenizer = gpt2_tokenizer()
    else:
        try:
            tokenizer = imported_tokenizer(tokenizer_file.read_text(encoding="utf-8"), config)
        except UnicodeDecodeError:
            raise refuse("tokenizer", "not UTF-8 text") from None
        except ValueError as e:
            raise refuse("tokenizer", e) from None
    if tokenizer.vocab_size > model.config.vocab_size:
        whose = "its tokenizer.json's" if tokenizer_file.exists() else (
            "GPT-2's, the tokenizer of an import without one: send the model's tokenizer.json as the `tokenizer` part")
        raise Invalid(f"the model's vocabulary has {model.config.vocab_size} tokens, fewer than the "
                      f"{tokenizer.vocab_size} of its tokenizer ({whose})", param="tokenizer")
    return model, tokenizer


@router.post("/import", status_code=201, response_model=CheckpointOut)
async def import_checkpoint(request: Request, database: DatabaseDep, settings: SettingsDep) -> CheckpointOut:
    """multipart/form-data with `weights` (model.safetensors), `config` (config.json) and, optionally, `tokenizer`
    (tokenizer.json) of a Hugging Face GPT-2, Llama or Qwen3 model, as published; it becomes an `lm` checkpoint
    with that tokenizer (run by tiktoken where it is GPT-2's, else by Hugging Face's tokenizers library, ending
    texts with config.json's eos_token_id), or GPT-2's without one. An optional `context_length` field serves and
    trains it at a shorter context than config.json's (Llama 3's 131072 would need a KV cache that large)."""
    storage = settings.storage
    staging = storage.staging_path(storage.checkpoints)
    staging.mkdir()

    def keep(fields: dict[str, str]) -> CheckpointOut:
        model, tokenizer = _import(staging)
        if "context_length" in fields:
            try:
                model.shorten_context(int(fields["context_length"]))
            except ValueError as e:
                raise Invalid(f"context_length: {e}", param="context_length") from None
        checkpoint_id = new_id("ckpt")
        target = save_checkpoint(storage.imported_checkpoint_dir(checkpoint_id), model, tokenizer,
                                 extra={"source": CheckpointSource.IMPORT})
        with database.session() as session:
            checkpoint = register_checkpoint(session, storage, target, read_metadata(target),
                                             checkpoint_id=checkpoint_id)
            return CheckpointOut.of(checkpoint)

    try:
        upload = await receive_upload(request, {part: staging / file for part, file in IMPORT_FILES.items()},
                                      settings.max_upload_bytes, optional=frozenset({"tokenizer"}))
        return await run_in_threadpool(keep, upload.fields)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
