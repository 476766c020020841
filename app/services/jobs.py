"""Checking a job request against the database and the model library, costing it, queueing it."""

import math
from dataclasses import dataclass, replace

from sqlalchemy.orm import Session

from app.schemas.jobs import JobCreate
from core import jobs
from core.enums import CheckpointTask
from core.errors import Invalid, Unavailable, no_such
from core.queue import JobQueue
from core.tables import Checkpoint, Corpus, Job
from model import PROMPT_FORMAT, ConfigError, GPTConfig, LoRAConfig
from model.config import GPT2_VOCAB_SIZE
from model.memory import finetune_bytes, human_bytes, num_parameters, training_bytes


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


@dataclass
class JobCost:
    """What a job will take: its model's parameters, its estimated memory, the tokens of each optimizer step (at
    most, for finetunes: their texts are padded to the longest of a batch)."""

    parameters: int
    memory_bytes: int
    tokens_per_step: int
    advice: str  # what to change when it does not fit
    steps: int = 0  # max_steps, or what its epochs come to (estimated: see _planned_steps)


def _language_model(session: Session, request: JobCreate) -> Checkpoint:
    """The base checkpoint the request names: a language model's."""
    checkpoint = named_row(session, Checkpoint, request.base_checkpoint_id, "checkpoint", "base_checkpoint_id")
    if checkpoint.task != CheckpointTask.LM:
        raise Invalid(f"checkpoint {checkpoint.id} is a {checkpoint.task} checkpoint; {request.type} starts "
                      f"from a language model (task lm)", param="base_checkpoint_id")
    return checkpoint


def _pretrain_cost(session: Session, request: JobCreate) -> tuple[dict, JobCost]:
    """The config of the model a pretraining job trains (a new one of the preset, or its base checkpoint's, to
    pretrain further), and its cost."""
    if request.base_checkpoint_id is not None:
        config = GPTConfig.from_dict(_language_model(session, request).model_config)
    else:
        tokenizer = request.tokenizer
        vocab_size = GPT2_VOCAB_SIZE if tokenizer == "gpt2" else tokenizer.vocab_size
        try:
            config = GPTConfig.preset(request.model.preset, vocab_size=vocab_size, **request.model.overrides())
        except ConfigError as e:
            raise Invalid(str(e), param="model") from None
    hp = request.hyperparameters
    window = hp.block_size or config.context_length
    if window > config.context_length:
        raise Invalid(f"block_size {window} exceeds the model's context length {config.context_length}",
                      param="hyperparameters.block_size")
    return config.to_dict(), JobCost(num_parameters(config), training_bytes(config, hp.batch_size, window),
                                     hp.batch_size * hp.grad_accum_steps * window,
                                     "choose a smaller model, batch_size or block_size")


def _finetune_cost(session: Session, request: JobCreate, corpus: Corpus) -> JobCost:
    checkpoint = _language_model(session, request)
    dpo = request.type == jobs.JobType.FINETUNE_DPO
    if dpo and checkpoint.prompt_format != PROMPT_FORMAT:
        raise Invalid(f"checkpoint {checkpoint.id} was not instruction-finetuned: DPO tunes an instruction model's "
                      f"answers (finetune_instruct first)", param="base_checkpoint_id")
    if request.adapter_only and checkpoint.adapter_of_id is not None:
        raise Invalid(f"checkpoint {checkpoint.id} is itself adapter-only: an adapter-only finetune starts from a "
                      f"checkpoint with all its weights (such as {checkpoint.adapter_of_id})",
                      param="base_checkpoint_id")
    config = GPTConfig.from_dict(checkpoint.model_config)
    classifier = request.type == jobs.JobType.FINETUNE_CLASSIFIER
    if classifier and request.trainable_blocks > config.n_layer:
        raise Invalid(f"trainable_blocks {request.trainable_blocks} exceeds the base model's {config.n_layer} "
                      f"blocks", param="trainable_blocks")
    hp = request.hyperparameters
    if hp.max_length is not None and hp.max_length > config.context_length:
        raise Invalid(f"max_length {hp.max_length} exceeds the base model's context length {config.context_length}",
                      param="hyperparameters.max_length")
    lora = LoRAConfig(**request.lora.model_dump()) if request.lora is not None else None
    length = hp.max_length or config.context_length
    # DPO runs each pair's chosen and rejected response in one batch: twice the rows
    memory = finetune_bytes(config, hp.batch_size * (2 if dpo else 1), length,
                            n_classes=len(corpus.label_names) if classifier else None,
                            trainable_blocks=request.trainable_blocks, lora=lora)
    return JobCost(num_parameters(config), memory, hp.batch_size * hp.grad_accum_steps * length,
                   "choose a smaller batch_size or max_length, or lora")


def check_job(session: Session, request: JobCreate) -> tuple[dict, JobCost]:
    """The spec a job of this request is stored with, and what it will cost; Invalid names what does not hold
    (but for its memory, which create_job holds to the limit)."""
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
        spec["model_config"], cost = _pretrain_cost(session, request)
    else:
        cost = _finetune_cost(session, request, corpus)
    return spec, replace(cost, steps=_planned_steps(request, corpus, cost))


def _planned_steps(request: JobCreate, corpus: Corpus, cost: JobCost) -> int:
    """max_steps; for a run of epochs, the steps they come to as the corpus's recorded size says (GPT-2 tokens
    or records): the worker counts them exactly once it has read the data, and corrects the job's total."""
    hp = request.hyperparameters
    if hp.epochs is None:
        return hp.max_steps
    kept = 1.0 if request.validation_corpus_id else 1 - request.validation_fraction  # the training split
    if request.type != jobs.JobType.PRETRAIN:
        batches = corpus.n_records * kept / hp.batch_size
    else:
        tokens = (corpus.n_tokens or corpus.size_bytes // 4) * kept  # about 4 bytes per GPT-2 token
        window = cost.tokens_per_step // (hp.batch_size * hp.grad_accum_steps)
        batches = tokens / (hp.stride or window) / hp.batch_size  # strided windows, or windows' worth of tokens
    return max(1, math.ceil(hp.epochs * max(1.0, batches) / hp.grad_accum_steps))


def memory_refusal(cost: JobCost, batch_size: int, max_memory_bytes: int) -> str | None:
    """Why a job of this cost is refused, or None when it fits."""
    if cost.memory_bytes <= max_memory_bytes:
        return None
    return (f"training this model with batch_size {batch_size} needs about {human_bytes(cost.memory_bytes)} "
            f"(weights, gradients, AdamW state and activations); the limit is {human_bytes(max_memory_bytes)} "
            f"(max_training_memory_bytes): {cost.advice}")


def create_job(session: Session, request: JobCreate, max_training_memory_bytes: int) -> Job:
    """A queued Job row (and its first event) for a request that holds up; Invalid names what does not."""
    spec, cost = check_job(session, request)
    if refusal := memory_refusal(cost, request.hyperparameters.batch_size, max_training_memory_bytes):
        raise Invalid(refusal, param="model")
    return jobs.create(session, name=request.name, type=request.type, corpus_id=request.corpus_id,
                       validation_corpus_id=request.validation_corpus_id,
                       base_checkpoint_id=request.base_checkpoint_id, spec=spec, seed=request.seed,
                       total_steps=cost.steps)


def send_job(queue: JobQueue, session: Session, job: Job) -> None:
    """Send a committed job to the workers; if the broker does not take it, the job fails (it must not sit
    queued forever) and the request is answered Unavailable."""
    try:
        queue.send(job.id, jobs.nodes(job.spec))
    except Exception as e:
        jobs.fail_unqueued(session, job.id, f"could not be queued: {e}")
        session.commit()
        session.refresh(job)
        raise Unavailable(f"the job queue is unavailable ({type(e).__name__}); job {job.id} was not queued") from e
