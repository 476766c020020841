"""Corpora: upload (streamed to disk, validated before it is kept), list, read, download, delete."""

import shutil
import uuid
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select

from app.auth import ReadOrTrain
from app.corpus_files import FORMATS, CorpusContentError, check_corpus, format_of
from app.deps import CorpusDep, PageDep, SessionDep, SettingsDep
from app.errors import APIError
from app.models import ACTIVE_JOB_STATUSES, Corpus, Job
from app.schemas.common import Deleted, Page
from app.schemas.corpora import CorpusKind, CorpusOut
from app.uploads import receive_upload

router = APIRouter(prefix="/v1/corpora", tags=["corpora"], dependencies=[ReadOrTrain])
MEDIA_TYPES = {"txt": "text/plain; charset=utf-8", "csv": "text/csv; charset=utf-8",
               "tsv": "text/tab-separated-values; charset=utf-8", "jsonl": "application/jsonl",
               "json": "application/json"}


def corpus_file(data_dir: Path, corpus: Corpus) -> Path:
    return data_dir / "corpora" / corpus.id / f"data.{corpus.format}"


@router.post("", status_code=201, response_model=CorpusOut)
async def upload_corpus(request: Request, session: SessionDep, settings: SettingsDep) -> Corpus:
    """multipart/form-data: `file`, `kind` (text | classification | instruction), optional `name` and
    `format` (txt | csv | tsv | jsonl | json; default: the file name's extension)."""
    staging_dir = settings.corpora_dir / ".staging"
    staging_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_dir / uuid.uuid4().hex
    upload = await receive_upload(request, {"file": staging}, settings.max_upload_bytes)
    try:
        kind = upload.fields.get("kind")
        if kind not in FORMATS:
            raise APIError(422, f"kind must be one of {', '.join(FORMATS)}, got {kind!r}", param="kind")
        name = upload.fields.get("name") or upload.filename or "corpus"
        if len(name) > 200:
            raise APIError(422, "name is longer than 200 characters", param="name")
        try:
            fmt = format_of(upload.filename, kind, upload.fields.get("format"))
            typed = staging.with_suffix(f".{fmt}")
            staging.rename(typed)
            staging = typed
            summary = await run_in_threadpool(check_corpus, staging, kind)
        except CorpusContentError as e:
            raise APIError(422, str(e), param="file") from None
        corpus = Corpus(name=name, kind=kind, filename=(upload.filename or "")[:255], format=fmt,
                        size_bytes=upload.size, sha256=upload.sha256, n_records=summary.n_records,
                        n_tokens=summary.n_tokens, label_names=summary.label_names)
        session.add(corpus)
        session.flush()
        final = corpus_file(settings.data_dir, corpus)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
        session.commit()
        return corpus
    finally:
        staging.unlink(missing_ok=True)


@router.get("", response_model=Page[CorpusOut])
def list_corpora(session: SessionDep, page: PageDep, kind: Annotated[CorpusKind | None, Query()] = None) -> dict:
    statement = select(Corpus)
    if kind is not None:
        statement = statement.where(Corpus.kind == kind)
    rows, has_more = page.apply(session, statement, Corpus)
    return {"data": rows, "has_more": has_more}


@router.get("/{corpus_id}", response_model=CorpusOut)
def get_corpus(corpus: CorpusDep) -> Corpus:
    return corpus


@router.get("/{corpus_id}/content")
def corpus_content(corpus: CorpusDep, settings: SettingsDep) -> FileResponse:
    path = corpus_file(settings.data_dir, corpus)
    if not path.is_file():
        raise APIError(410, f"the file of corpus {corpus.id} is missing from the data dir", type_="gone")
    download_name = Path(corpus.filename).name or f"{corpus.id}.{corpus.format}"
    return FileResponse(path, media_type=MEDIA_TYPES[corpus.format], filename=download_name)


@router.delete("/{corpus_id}", response_model=Deleted)
def delete_corpus(corpus: CorpusDep, session: SessionDep, settings: SettingsDep) -> dict:
    users = session.scalars(select(Job.id).where(
        (Job.corpus_id == corpus.id) | (Job.validation_corpus_id == corpus.id),
        Job.status.in_(ACTIVE_JOB_STATUSES)).limit(5)).all()
    if users:
        raise APIError(409, f"corpus {corpus.id} is used by queued or running job(s) {', '.join(users)}",
                       param="corpus_id")
    if session.scalars(select(Job.id).where(
            (Job.corpus_id == corpus.id) | (Job.validation_corpus_id == corpus.id)).limit(1)).first():
        raise APIError(409, f"corpus {corpus.id} is referenced by finished jobs; it is kept as their record",
                       param="corpus_id")
    session.delete(corpus)
    session.commit()
    shutil.rmtree(corpus_file(settings.data_dir, corpus).parent, ignore_errors=True)
    return {"id": corpus.id, "object": "corpus"}
