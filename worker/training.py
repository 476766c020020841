"""From a job's spec to a trained model: tokenizer, data, model and objective, as the job type asks, then the
Trainer, resumed from the job's latest checkpoint."""

import json
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.checkpoints import base_dir
from core.jobs import JobType
from core.storage import DataDir
from core.tables import Checkpoint, Corpus, Job
from model import (
    GPT,
    PROMPT_FORMAT,
    Callback,
    ClassificationObjective,
    GPTClassifier,
    GPTConfig,
    InstructionObjective,
    LoRAConfig,
    PretrainObjective,
    TrainConfig,
    Trainer,
    TrainResult,
    apply_lora,
    encode_classification,
    encode_instruction,
    freeze_for_finetune,
    get_tokenizer,
    gpt2_tokenizer,
    has_training_state,
    load_checkpoint,
    merge_lora,
    open_tokens,
    read_classification_file,
    read_instruction_file,
    read_metadata,
    split_dataset,
    split_tokens,
    steps_for_epochs,
    tokenize_to_memmap,
    tokenizer_from_spec,
    train_bpe,
    weights_sha256,
)
from model.data import read_token_info
from model.dpo import DPOObjective, pair_logprobs, without_dropout
from model.preference_data import encode_preference, read_preference_file
from model.trainer import autocast_for, resolve_device


@dataclass
class Plan:
    model: torch.nn.Module
    objective: object
    config: TrainConfig
    tokenizer: object
    label_names: list[str] | None = None
    lora: LoRAConfig | None = None
    prompt_format: str | None = None
    adapter_of: dict | None = None  # adapter-only checkpoints: what identifies the weights they load over


def pool_gpus(worker_concurrency: int) -> list[int]:
    """The GPUs of this pool process: the worker's GPUs shared out among its worker_concurrency pool processes
    (several processes share one when there are fewer GPUs than processes); none without CUDA."""
    if not torch.cuda.is_available():
        return []
    from billiard.process import current_process

    index = (getattr(current_process(), "index", 0) or 0) % worker_concurrency
    count = torch.cuda.device_count()
    if count < worker_concurrency:
        return [index % count]
    return list(range(index * count // worker_concurrency, (index + 1) * count // worker_concurrency))


def pool_device(worker_concurrency: int) -> str:
    """Where this pool process runs work on one device: its first GPU, or the CPU."""
    gpus = pool_gpus(worker_concurrency)
    return f"cuda:{gpus[0]}" if gpus else "cpu"


def job_devices(spec: dict, worker_concurrency: int) -> list[str]:
    """The device of each of the job's ranks. On GPUs, `auto` takes as many of this pool process's GPUs as
    divide the job's gradient accumulation; on a worker without GPUs each rank is a CPU process."""
    requested, accumulation = spec.get("devices", 1), spec["hyperparameters"]["grad_accum_steps"]
    gpus = pool_gpus(worker_concurrency)
    if requested == "auto":
        requested = max(n for n in range(1, max(len(gpus), 1) + 1) if accumulation % n == 0)
    if not gpus:
        return ["cpu"] * requested
    if requested > len(gpus):
        raise ValueError(f"the job asks for {requested} devices; this worker process has {len(gpus)} GPU(s) "
                         f"({torch.cuda.device_count()} GPUs shared by worker_concurrency {worker_concurrency})")
    return [f"cuda:{i}" for i in gpus[:requested]]


def train_config(spec: dict, device: str) -> TrainConfig:
    hp = spec["hyperparameters"]
    # a run of epochs has its steps counted once its data is read (plan_job)
    return TrainConfig.from_values({**hp, "max_steps": hp["max_steps"] or 1}, device=device)


def _pretrain_tokenizer(spec: dict, text_path: Path, work: Path, base: Path | None):
    """The base checkpoint's tokenizer (continued pretraining), GPT-2's, or a BPE trained on the corpus once and
    kept, so a resumed job reuses it."""
    if base is not None:
        return tokenizer_from_spec(read_metadata(base)["tokenizer"])
    if spec["tokenizer"] == "gpt2":
        return gpt2_tokenizer()
    saved = work / "tokenizer.json"
    if saved.is_file():
        return get_tokenizer(saved)
    with open(text_path, encoding="utf-8") as f:
        tokenizer = train_bpe(iter(lambda: f.read(1 << 20), ""), spec["tokenizer"]["vocab_size"])
    saved.write_text(json.dumps(tokenizer.spec()))
    return tokenizer


def corpus_tokens(text_path: Path, tokenizer, out: Path) -> np.ndarray:
    """The corpus's token ids, tokenized into `out` once (a restarted job reuses a complete file)."""
    try:
        read_token_info(out)
    except ValueError:  # not there, or left half-written by a killed worker
        tokenize_to_memmap(text_path, tokenizer, out)
    return open_tokens(out)


def _pretrain_tokens(job: Job, storage: DataDir, inputs: "TrainingInputs", work: Path):
    """(the tokenizer, the corpus's token ids, the validation corpus's or None), tokenized once."""
    corpora = inputs.corpora
    text_path = storage.corpus_file(job.corpus_id, corpora[job.corpus_id])
    tokenizer = _pretrain_tokenizer(job.spec, text_path, work, inputs.base_dir)
    tokens = corpus_tokens(text_path, tokenizer, work / "train.bin")
    if not job.validation_corpus_id:
        return tokenizer, tokens, None
    val_path = storage.corpus_file(job.validation_corpus_id, corpora[job.validation_corpus_id])
    return tokenizer, tokens, corpus_tokens(val_path, tokenizer, work / "val.bin")


def _plan_pretrain(job: Job, storage: DataDir, inputs: "TrainingInputs", work: Path, device: str) -> Plan:
    spec, hp = job.spec, job.spec["hyperparameters"]
    tokenizer, tokens, val_tokens = _pretrain_tokens(job, storage, inputs, work)
    model = _base(inputs)[0] if inputs.base_dir is not None else GPT(
        GPTConfig.from_dict({**spec["model_config"], "vocab_size": tokenizer.vocab_size}))
    config = model.config
    block = hp["block_size"] or config.context_length
    if val_tokens is not None:
        train, val = tokens, val_tokens
    else:
        train, val = split_tokens(tokens, spec["validation_fraction"], block)
    objective = PretrainObjective(train, val, block_size=block, batch_size=hp["batch_size"], seed=job.seed,
                                  stride=hp["stride"])
    return Plan(model, objective, train_config(spec, device), tokenizer)


def _base(inputs: "TrainingInputs"):
    """The base checkpoint's model, adapters merged: the finetune's LoRA, if any, is its own."""
    model, tokenizer, meta = load_checkpoint(inputs.base_dir, base=inputs.base_adapter_of_dir)
    return merge_lora(model).train(), tokenizer, meta


def _lora(spec: dict) -> LoRAConfig | None:
    return LoRAConfig(**spec["lora"]) if spec.get("lora") else None


def _plan_classifier(job: Job, storage: DataDir, inputs: "TrainingInputs", device: str) -> Plan:
    spec, hp, corpora = job.spec, job.spec["hyperparameters"], inputs.corpora
    base, tokenizer, _ = _base(inputs)
    data = read_classification_file(storage.corpus_file(job.corpus_id, corpora[job.corpus_id]))
    if job.validation_corpus_id:
        val = read_classification_file(storage.corpus_file(job.validation_corpus_id,
                                                           corpora[job.validation_corpus_id]),
                                       label_names=data.label_names)
    else:
        data, val = split_dataset(data,
                                  (1 - spec["validation_fraction"], spec["validation_fraction"]), job.seed)
    max_length = hp["max_length"] or base.config.context_length
    train_ids = encode_classification(data.texts, tokenizer, max_length=max_length, pad_id=tokenizer.eot_id)
    val_ids = encode_classification(val.texts, tokenizer, max_length=max_length, pad_id=tokenizer.eot_id)
    objective = ClassificationObjective((*train_ids, torch.tensor(data.labels)),
                                        (*val_ids, torch.tensor(val.labels)), batch_size=hp["batch_size"],
                                        seed=job.seed)
    model = GPTClassifier.from_lm(base, len(data.label_names))
    lora = _lora(spec)
    if lora is not None:
        apply_lora(model, lora, trainable=(model.head,))
    else:
        freeze_for_finetune(model, spec["trainable_blocks"])
    return Plan(model, objective, train_config(spec, device), tokenizer, label_names=list(data.label_names), lora=lora)


def _records(job: Job, storage: DataDir, inputs: "TrainingInputs", read) -> tuple[list[dict], list[dict]]:
    """(training, validation) records of an instruction or preference job: its validation corpus, or a seeded
    share of its corpus."""
    corpora = inputs.corpora
    records = read(storage.corpus_file(job.corpus_id, corpora[job.corpus_id]))
    if job.validation_corpus_id:
        return records, read(storage.corpus_file(job.validation_corpus_id, corpora[job.validation_corpus_id]))
    n_val = max(1, int(len(records) * job.spec["validation_fraction"]))
    if len(records) - n_val < 1:
        raise ValueError(f"{len(records)} record(s) cannot be split into training and validation")
    order = np.random.default_rng(job.seed).permutation(len(records))
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def _language_plan(job: Job, model, tokenizer, base_meta: dict, objective, device: str) -> Plan:
    """The plan of an instruction or preference finetune: LoRA if asked, adapter-only if asked."""
    spec = job.spec
    lora = _lora(spec)
    if lora is not None:
        apply_lora(model, lora)
    adapter_of = {"sha256": weights_sha256(base_meta)} if spec.get("adapter_only") else None
    return Plan(model, objective, train_config(spec, device), tokenizer, lora=lora, prompt_format=PROMPT_FORMAT,
                adapter_of=adapter_of)


def _plan_dpo(job: Job, storage: DataDir, inputs: "TrainingInputs", device: str) -> Plan:
    spec, hp = job.spec, job.spec["hyperparameters"]
    model, tokenizer, base_meta = _base(inputs)
    without_dropout(model)
    records, val_records = _records(job, storage, inputs, read_preference_file)
    max_length = min(hp["max_length"] or model.config.context_length, model.config.context_length)
    train, val = ([encode_preference(r, tokenizer, max_length) for r in rs] for rs in (records, val_records))
    # the reference is the base as it is now, before LoRA or a step: scored once, then no second model is held
    placed = resolve_device(device)
    model.to(placed)
    autocast = partial(autocast_for, placed)  # as the trainer evaluates: the same numbers at step 0
    references = [pair_logprobs(model, pairs, tokenizer.eot_id, hp["batch_size"], autocast) for pairs in (train, val)]
    objective = DPOObjective(train, val, *references, batch_size=hp["batch_size"], seed=job.seed,
                             pad_id=tokenizer.eot_id, beta=spec["dpo_beta"])
    return _language_plan(job, model.train(), tokenizer, base_meta, objective, device)


def _plan_instruct(job: Job, storage: DataDir, inputs: "TrainingInputs", device: str) -> Plan:
    spec, hp = job.spec, job.spec["hyperparameters"]
    model, tokenizer, base_meta = _base(inputs)
    records, val_records = _records(job, storage, inputs, read_instruction_file)
    max_length = min(hp["max_length"] or model.config.context_length, model.config.context_length)
    objective = InstructionObjective([encode_instruction(r, tokenizer) for r in records],
                                     [encode_instruction(r, tokenizer) for r in val_records],
                                     batch_size=hp["batch_size"],
                                     seed=job.seed, pad_id=tokenizer.eot_id, max_length=max_length,
                                     mask_prompt=spec["mask_prompt"])
    return _language_plan(job, model, tokenizer, base_meta, objective, device)


def plan_job(job: Job, storage: DataDir, inputs: "TrainingInputs", device: str) -> Plan:
    """What the job trains, on what, from what; device is where this process trains."""
    torch.manual_seed(job.seed)  # new weights (a model, a classifier's head, LoRA's) are the job's own
    work = storage.job_work_dir(job.id)
    work.mkdir(parents=True, exist_ok=True)
    if job.type == JobType.PRETRAIN:
        plan = _plan_pretrain(job, storage, inputs, work, device)
    elif job.type == JobType.FINETUNE_CLASSIFIER:
        plan = _plan_classifier(job, storage, inputs, device)
    elif job.type == JobType.FINETUNE_DPO:
        plan = _plan_dpo(job, storage, inputs, device)
    else:
        plan = _plan_instruct(job, storage, inputs, device)
    epochs = job.spec["hyperparameters"].get("epochs")
    if epochs is not None:  # counted on the data now read: the same count on every rank and after a resume
        plan.config = replace(plan.config, max_steps=steps_for_epochs(plan.objective, epochs,
                                                                      plan.config.grad_accum_steps))
    return plan


def prepare_data(job: Job, storage: DataDir, inputs: "TrainingInputs") -> None:
    """Write the files a job's plan reads, once: a pretraining job's tokenizer and token files. Ranks that
    plan the same job at the same time then only read them."""
    if job.type == JobType.PRETRAIN:
        work = storage.job_work_dir(job.id)
        work.mkdir(parents=True, exist_ok=True)
        _pretrain_tokens(job, storage, inputs, work)


@dataclass
class TrainingInputs:
    """What the database says a training job starts from."""

    corpora: dict[str, str]  # corpus id -> format
    base_id: str | None = None
    base_dir: Path | None = None
    base_adapter_of_dir: Path | None = None  # where an adapter-only base checkpoint loads over
    resume_id: str | None = None  # the job's latest checkpoint that holds its training state
    resume_step: int = 0
    resume_dir: Path | None = None


def training_inputs(session: Session, storage: DataDir, job: Job) -> TrainingInputs:
    corpus_ids = [i for i in (job.corpus_id, job.validation_corpus_id) if i]
    inputs = TrainingInputs(dict(session.execute(select(Corpus.id, Corpus.format).where(Corpus.id.in_(corpus_ids)))
                                 .all()))
    if job.base_checkpoint_id:
        base = session.get(Checkpoint, job.base_checkpoint_id)
        inputs.base_id, inputs.base_dir = base.id, storage.checkpoint_dir(base.path)
        inputs.base_adapter_of_dir = base_dir(session, storage, base)
    for checkpoint in session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)
                                      .order_by(Checkpoint.step.desc())):
        if has_training_state(storage.checkpoint_dir(checkpoint.path)):
            inputs.resume_id, inputs.resume_step = checkpoint.id, checkpoint.step
            inputs.resume_dir = storage.checkpoint_dir(checkpoint.path)
            break
    return inputs


def train_job(storage: DataDir, job: Job, inputs: TrainingInputs, callback: Callback, device: str) -> TrainResult:
    """Train the job on device (in every rank's process, for a job on several devices), from its latest
    checkpoint if it has one."""
    plan = plan_job(job, storage, inputs, device)
    trainer = Trainer(plan.model, plan.objective, plan.config, plan.tokenizer, storage.job_checkpoints_dir(job.id),
                      callback, seed=job.seed, label_names=plan.label_names, lora=plan.lora, parent=inputs.base_id,
                      prompt_format=plan.prompt_format, adapter_of=plan.adapter_of)
    if inputs.resume_dir is not None:
        # the job's own checkpoint: an adapter-only one loads over the job's base
        plan.model.load_state_dict(load_checkpoint(inputs.resume_dir, base=inputs.base_dir)[0].state_dict())
        trainer.resume(inputs.resume_dir)
    return trainer.train()
