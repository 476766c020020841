"""Checking a job request against the database and the model library, queueing it."""

from sqlalchemy.orm import Session

from app.schemas.jobs import JobCreate
from core import jobs
from core.enums import CheckpointTask
from core.errors import Invalid, Unavailable, no_such
from core.queue import JobQueue
from core.tables import Checkpoint, Corpus, Job
from model import ConfigError, GPTConfig, LoRAConfig
from model.config import GPT2_VOCAB_SIZE
from model.memory import finetune_bytes, human_bytes, training_bytes


def named_row(session: Session, model, key: str, what: str, param: str):
    """The row a request names, or Invalid naming the missing id (it is the request that is wrong)."""
    row = session.get(model, key)
    if row is None:
        raise Invalid(no_such(what, key), param=param)
    return row


def _corpus(session: Session, corpus_id: str, param: str, kind: str) -> Corpus:
    corpus = named_row(session, Corpus, corpus_id, "corpus", param)
    if corpus.kind != kind:
        article = "an" if kind[0] in "aeiou" else "a"
        raise Invalid(f"corpus {corpus_id} is a {corpus.kind} corpus; this job needs {article} {kind} corpus",
                      param=param)
    return corpus


def _within_memory(estimate: int, max_memory_bytes: int, batch_size: int, advice: str) -> None:
    if estimate > max_memory_bytes:
        raise Invalid(f"training this model with batch_size {batch_size} needs about {human_bytes(estimate)} "
                      f"(weights, gradients, AdamW state and activations); the limit is "
                      f"{human_bytes(max_memory_bytes)} (max_training_memory_bytes): {advice}", param="model")


def _model_config(request: JobCreate, max_memory_bytes: int) -> dict:
    tokenizer = request.tokenizer
    vocab_size = GPT2_VOCAB_SIZE if tokenizer == "gpt2" else tokenizer.vocab_size
    try:
        config = GPTConfig.preset(request.model.preset, vocab_size=vocab_size, **request.model.overrides())
    except ConfigError as e:
        raise Invalid(str(e), param="model") from None
    block_size = request.hyperparameters.block_size
    if block_size is not None and block_size > config.context_length:
        raise Invalid(f"block_size {block_size} exceeds the model's context length {config.context_length}",
                      param="hyperparameters.block_size")
    batch_size = request.hyperparameters.batch_size
    _within_memory(training_bytes(config, batch_size, block_size or config.context_length), max_memory_bytes,
                   batch_size, "choose a smaller model, batch_size or block_size")
    return config.to_dict()


def _base_checkpoint(session: Session, request: JobCreate, corpus: Corpus, max_memory_bytes: int) -> None:
    checkpoint = named_row(session, Checkpoint, request.base_checkpoint_id, "checkpoint", "base_checkpoint_id")
    if checkpoint.task != CheckpointTask.LM:
        raise Invalid(f"checkpoint {checkpoint.id} is a {checkpoint.task} checkpoint; {request.type} starts "
                      f"from a language model (task lm)", param="base_checkpoint_id")
    config = GPTConfig.from_dict(checkpoint.model_config)
    classifier = request.type == jobs.JobType.FINETUNE_CLASSIFIER
    if classifier and request.trainable_blocks > config.n_layer:
        raise Invalid(f"trainable_blocks {request.trainable_blocks} exceeds the base model's {config.n_layer} "
                      f"blocks", param="trainable_blocks")
    max_length = request.hyperparameters.max_length
    if max_length is not None and max_length > config.context_length:
        raise Invalid(f"max_length {max_length} exceeds the base model's context length {config.context_length}",
                      param="hyperparameters.max_length")
    batch_size = request.hyperparameters.batch_size
    lora = LoRAConfig(**request.lora.model_dump()) if request.lora is not None else None
    estimate = finetune_bytes(config, batch_size, max_length or config.context_length,
                              n_classes=len(corpus.label_names) if classifier else None,
                              trainable_blocks=request.trainable_blocks, lora=lora)
    _within_memory(estimate, max_memory_bytes, batch_size, "choose a smaller batch_size or max_length, or lora")


def create_job(session: Session, request: JobCreate, max_training_memory_bytes: int) -> Job:
    """A queued Job row (and its first event) for a request that holds up; Invalid names what does not."""
    kind = jobs.CORPUS_KIND[request.type]
    corpus = _corpus(session, request.corpus_id, "corpus_id", kind)
    if request.validation_corpus_id is not None:
        validation = _corpus(session, request.validation_corpus_id, "validation_corpus_id", kind)
        unknown = sorted(set(validation.label_names or []) - set(corpus.label_names or []))
        if unknown:
            raise Invalid(f"validation corpus labels {unknown} do not occur in the training corpus "
                          f"(labels {corpus.label_names})", param="validation_corpus_id")
    spec = request.model_dump(mode="json")
    if request.type == jobs.JobType.PRETRAIN:
        spec["model_config"] = _model_config(request, max_training_memory_bytes)
    else:
        _base_checkpoint(session, request, corpus, max_training_memory_bytes)
    return jobs.create(session, name=request.name, type=request.type, corpus_id=request.corpus_id,
                       validation_corpus_id=request.validation_corpus_id,
                       base_checkpoint_id=request.base_checkpoint_id, spec=spec, seed=request.seed,
                       total_steps=request.hyperparameters.max_steps)


def send_job(queue: JobQueue, session: Session, job: Job) -> None:
    """Send a committed job to the workers; if the broker does not take it, the job fails (it must not sit
    queued forever) and the request is answered Unavailable."""
    try:
        queue.send(job.id)
    except Exception as e:
        jobs.fail_unqueued(session, job.id, f"could not be queued: {e}")
        session.commit()
        session.refresh(job)
        raise Unavailable(f"the job queue is unavailable ({type(e).__name__}); job {job.id} was not queued") from e
