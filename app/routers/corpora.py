"""Corpora: upload (streamed to disk, validated before it is kept), list, read, download, delete."""

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select

from app.auth import Deployer, ReadOrTrain
from app.deps import CorpusDep, DatabaseDep, PageDep, SessionDep, SettingsDep, StorageDep
from app.schemas.common import Deleted, Page
from app.schemas.corpora import CorpusKindName, CorpusOut
from app.services import corpora
from app.uploads import receive_upload
from core.errors import Gone
from core.tables import Corpus

router = APIRouter(prefix="/v1/corpora", tags=["corpora"], dependencies=[ReadOrTrain])
MEDIA_TYPES = {"txt": "text/plain; charset=utf-8", "csv": "text/csv; charset=utf-8",
               "tsv": "text/tab-separated-values; charset=utf-8", "jsonl": "application/jsonl",
               "json": "application/json"}


@router.post("", status_code=201, response_model=CorpusOut)
async def upload_corpus(request: Request, database: DatabaseDep, settings: SettingsDep) -> Corpus:
    """multipart/form-data: `file`, `kind` (text | classification | instruction), optional `name` and
    `format` (txt | csv | tsv | jsonl | json; default: the file name's extension)."""
    staging = settings.storage.staging_path(settings.storage.corpora)
    upload = await receive_upload(request, {"file": staging}, settings.max_upload_bytes)

    def keep() -> Corpus:
        with database.session() as session:
            return corpora.keep_upload(session, settings.storage, upload, staging, settings.max_record_corpus_bytes)

    return await run_in_threadpool(keep)


@router.get("", response_model=Page[CorpusOut])
def list_corpora(session: SessionDep, page: PageDep, kind: Annotated[CorpusKindName | None, Query()] = None) -> dict:
    statement = select(Corpus)
    if kind is not None:
        statement = statement.where(Corpus.kind == kind)
    rows, has_more = page.apply(session, statement, Corpus)
    return {"data": rows, "has_more": has_more}


@router.get("/{corpus_id}", response_model=CorpusOut)
def get_corpus(corpus: CorpusDep) -> Corpus:
    return corpus


@router.get("/{corpus_id}/content")
def corpus_content(corpus: CorpusDep, storage: StorageDep) -> FileResponse:
    path = storage.corpus_file(corpus.id, corpus.format)
    if not path.is_file():
        raise Gone(f"the file of corpus {corpus.id} is missing from the data dir")
    download_name = Path(corpus.filename).name or f"{corpus.id}.{corpus.format}"
    return FileResponse(path, media_type=MEDIA_TYPES[corpus.format], filename=download_name)


@router.delete("/{corpus_id}", response_model=Deleted, dependencies=[Deployer])
def delete_corpus(corpus: CorpusDep, session: SessionDep, storage: StorageDep) -> dict:
    corpora.delete_corpus(session, storage, corpus)
    return {"id": corpus.id, "object": "corpus"}
