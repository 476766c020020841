"""Checking a job request against the database and the model library, queueing it, cancelling it."""

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session

from app.db import utcnow
from app.errors import APIError
from app.models import FINISHED_JOB_STATUSES, Checkpoint, Corpus, Job, JobEvent
from app.queue import enqueue_job
from app.schemas.jobs import CORPUS_KIND_OF, JobCreate
from app.settings import Settings
from model import ConfigError, GPTConfig
from model.config import GPT2_VOCAB_SIZE


def found_or_422(session: Session, model, key: str, what: str, param: str):
    """The row a request names, or a 422 that names the missing id (it is the request that is wrong)."""
    row = session.get(model, key)
    if row is None:
        raise APIError(422, f"no {what} with id {key!r}", param=param)
    return row


def _corpus(session: Session, corpus_id: str, param: str, kind: str) -> Corpus:
    corpus = found_or_422(session, Corpus, corpus_id, "corpus", param)
    if corpus.kind != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise APIError(422, f"corpus {corpus_id} is a {corpus.kind} corpus; this job needs {article} {kind} corpus",
                       param=param)
    return corpus


def _model_config(request: JobCreate) -> dict:
    tokenizer = request.tokenizer
    vocab_size = GPT2_VOCAB_SIZE if tokenizer == "gpt2" else tokenizer.vocab_size
    try:
        config = GPTConfig.preset(request.model.preset, vocab_size=vocab_size, **request.model.overrides())
    except ConfigError as e:
        raise APIError(422, str(e), param="model") from None
    block_size = request.hyperparameters.block_size
    if block_size is not None and block_size > config.context_length:
        raise APIError(422, f"block_size {block_size} exceeds the model's context length {config.context_length}",
                       param="hyperparameters.block_size")
    return config.to_dict()


def _base_checkpoint(session: Session, request: JobCreate) -> Checkpoint:
    checkpoint = found_or_422(session, Checkpoint, request.base_checkpoint_id, "checkpoint", "base_checkpoint_id")
    if checkpoint.task != "lm":
        raise APIError(422, f"checkpoint {checkpoint.id} is a {checkpoint.task} checkpoint; {request.type} starts "
                            f"from a language model (task lm)", param="base_checkpoint_id")
    n_layer = checkpoint.model_config["n_layer"]
    if request.type == "finetune_classifier" and request.trainable_blocks > n_layer:
        raise APIError(422, f"trainable_blocks {request.trainable_blocks} exceeds the base model's {n_layer} blocks",
                       param="trainable_blocks")
    max_length = request.hyperparameters.max_length
    if max_length is not None and max_length > checkpoint.model_config["context_length"]:
        raise APIError(422, f"max_length {max_length} exceeds the base model's context length "
                            f"{checkpoint.model_config['context_length']}", param="hyperparameters.max_length")
    return checkpoint


def create_job(session: Session, request: JobCreate) -> Job:
    """A queued Job row (and its first event) for a request that holds up; APIError names what does not."""
    kind = CORPUS_KIND_OF[request.type]
    corpus = _corpus(session, request.corpus_id, "corpus_id", kind)
    if request.validation_corpus_id is not None:
        validation = _corpus(session, request.validation_corpus_id, "validation_corpus_id", kind)
        unknown = sorted(set(validation.label_names or []) - set(corpus.label_names or []))
        if unknown:
            raise APIError(422, f"validation corpus labels {unknown} do not occur in the training corpus "
                                f"(labels {corpus.label_names})", param="validation_corpus_id")
    spec = request.model_dump(mode="json")
    if request.type == "pretrain":
        spec["model_config"] = _model_config(request)
    else:
        _base_checkpoint(session, request)
    job = Job(name=request.name, type=request.type, corpus_id=request.corpus_id,
              validation_corpus_id=request.validation_corpus_id, base_checkpoint_id=request.base_checkpoint_id,
              spec=spec, seed=request.seed, total_steps=request.hyperparameters.max_steps)
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, type="status", message="job queued", data={"status": "queued"}))
    return job


def queue_job(celery: Celery, settings: Settings, session: Session, job: Job) -> None:
    """Send a committed job to the workers; if the broker does not take it, the job fails (it must not sit
    queued forever) and the caller gets a 503."""
    try:
        enqueue_job(celery, settings, job.id)
    except Exception as e:
        job.status, job.error, job.finished_at = "failed", f"could not be queued: {e}", utcnow()
        session.commit()
        raise APIError(503, f"the job queue is unavailable ({type(e).__name__}); job {job.id} was not queued") from e


def cancel_job(session: Session, job: Job) -> None:
    """A queued job is cancelled at once; a running one is asked to stop, and its worker ends it."""
    if job.status in FINISHED_JOB_STATUSES:
        raise APIError(409, f"job {job.id} already ended {job.status}", param="job_id")
    if job.status == "queued":
        # conditional: a worker may be taking the job at this very moment
        taken = session.execute(update(Job).where(Job.id == job.id, Job.status == "queued").values(
            status="cancelled", cancel_requested=True, finished_at=utcnow())).rowcount
        if taken:
            session.add(JobEvent(job_id=job.id, type="status", message="job cancelled before it started",
                                 data={"status": "cancelled"}))
            session.commit()
            session.refresh(job)
            return
    session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
    session.add(JobEvent(job_id=job.id, type="cancel", message="cancellation requested"))
    session.commit()
    session.refresh(job)
