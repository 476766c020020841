"""Corpora: keeping a checked upload under its id, and deleting one no job needs."""

import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.corpus_files import CorpusContentError, check_corpus, format_of
from app.uploads import Upload
from core import jobs
from core.enums import CorpusKind
from core.errors import Conflict, Invalid
from core.storage import DataDir
from core.tables import Corpus, Job

MAX_NAME_CHARS = 200


def keep_upload(session: Session, storage: DataDir, upload: Upload, staging: Path, max_record_bytes: int) -> Corpus:
    """Check the file received at staging as a corpus of the kind its form names and keep it; Invalid names
    the problem. The staging file is gone afterwards, kept or not. The file is checked a block or a record at a time;
    jobs read a file of records whole, so those files are held to max_record_bytes."""
    try:
        kind = upload.fields.get("kind")
        if kind not in tuple(CorpusKind):
            raise Invalid(f"kind must be one of {', '.join(CorpusKind)}, got {kind!r}", param="kind")
        if kind != CorpusKind.TEXT and upload.size > max_record_bytes:
            raise Invalid(f"a {kind} corpus is read whole by the jobs that train on it: at most "
                          f"{max_record_bytes:,} bytes (max_record_corpus_bytes), not {upload.size:,}", param="file")
        name = upload.fields.get("name") or upload.filename or "corpus"
        if len(name) > MAX_NAME_CHARS:
            raise Invalid(f"name is longer than {MAX_NAME_CHARS} characters", param="name")
        try:
            fmt = format_of(upload.filename, CorpusKind(kind), upload.fields.get("format"))
            typed = staging.with_suffix(f".{fmt}")
            staging.rename(typed)
            staging = typed
            summary = check_corpus(staging, CorpusKind(kind))
        except CorpusContentError as e:
            raise Invalid(str(e), param="file") from None
        corpus = Corpus(name=name, kind=kind, filename=(upload.filename or "")[:255], format=fmt,
                        size_bytes=upload.size, sha256=upload.sha256, n_records=summary.n_records,
                        n_tokens=summary.n_tokens, label_names=summary.label_names)
        session.add(corpus)
        session.flush()
        final = storage.corpus_file(corpus.id, fmt)
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)
        session.commit()
        return corpus
    finally:
        staging.unlink(missing_ok=True)


def delete_corpus(session: Session, storage: DataDir, corpus: Corpus) -> None:
    """Remove a corpus no job refers to; Conflict names the jobs that do."""
    uses = (Job.corpus_id == corpus.id) | (Job.validation_corpus_id == corpus.id)
    users = session.scalars(select(Job.id).where(uses, Job.status.in_(jobs.ACTIVE)).limit(5)).all()
    if users:
        raise Conflict(f"corpus {corpus.id} is used by queued or running job(s) {', '.join(users)}",
                       param="corpus_id")
    if session.scalars(select(Job.id).where(uses).limit(1)).first():
        raise Conflict(f"corpus {corpus.id} is referenced by finished jobs; it is kept as their record",
                       param="corpus_id")
    session.delete(corpus)
    session.commit()
    shutil.rmtree(storage.corpus_dir(corpus.id), ignore_errors=True)
