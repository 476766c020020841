"""From a job's spec to a ready Trainer: tokenizer, data, model and objective, as the job type asks."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core.jobs import JobType
from core.storage import DataDir
from core.tables import Job
from model import (
    GPT,
    PROMPT_FORMAT,
    ClassificationObjective,
    GPTClassifier,
    GPTConfig,
    InstructionObjective,
    LoRAConfig,
    PretrainObjective,
    TrainConfig,
    apply_lora,
    encode_classification,
    encode_instruction,
    freeze_for_finetune,
    get_tokenizer,
    gpt2_tokenizer,
    load_checkpoint,
    open_tokens,
    read_classification_file,
    read_instruction_file,
    split_dataset,
    split_tokens,
    tokenize_to_memmap,
    train_bpe,
)
from model.data import read_token_info


@dataclass
class Plan:
    model: torch.nn.Module
    objective: object
    config: TrainConfig
    tokenizer: object
    label_names: list[str] | None = None
    lora: LoRAConfig | None = None
    prompt_format: str | None = None


def pool_device() -> str:
    """This pool process's device: with one pool process per GPU, the n-th process trains on GPU n."""
    if not torch.cuda.is_available():
        return "cpu"
    from billiard.process import current_process

    index = getattr(current_process(), "index", 0) or 0
    return f"cuda:{index % torch.cuda.device_count()}"


def train_config(spec: dict) -> TrainConfig:
    return TrainConfig.from_values(spec["hyperparameters"], device=pool_device())


def _pretrain_tokenizer(spec: dict, text_path: Path, work: Path):
    """GPT-2's tokenizer, or a BPE trained on the corpus once and kept, so a resumed job reuses it."""
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


def _plan_pretrain(job: Job, storage: DataDir, corpora: dict, work: Path) -> Plan:
    spec, hp = job.spec, job.spec["hyperparameters"]
    text_path = storage.corpus_file(job.corpus_id, corpora[job.corpus_id])
    tokenizer = _pretrain_tokenizer(spec, text_path, work)
    config = GPTConfig.from_dict({**spec["model_config"], "vocab_size": tokenizer.vocab_size})
    block = hp["block_size"] or config.context_length
    tokens = corpus_tokens(text_path, tokenizer, work / "train.bin")
    if job.validation_corpus_id:
        val_path = storage.corpus_file(job.validation_corpus_id, corpora[job.validation_corpus_id])
        train, val = tokens, corpus_tokens(val_path, tokenizer, work / "val.bin")
    else:
        train, val = split_tokens(tokens, spec["validation_fraction"], block)
    objective = PretrainObjective(train, val, block_size=block, batch_size=hp["batch_size"], seed=job.seed,
                                  stride=hp["stride"])
    return Plan(GPT(config), objective, train_config(spec), tokenizer)


def _base(storage: DataDir, base_path: str):
    model, tokenizer, meta = load_checkpoint(storage.checkpoint_dir(base_path))
    return model.train(), tokenizer, meta


def _lora(spec: dict) -> LoRAConfig | None:
    return LoRAConfig(**spec["lora"]) if spec.get("lora") else None


def _plan_classifier(job: Job, storage: DataDir, corpora: dict, base_path: str) -> Plan:
    spec, hp = job.spec, job.spec["hyperparameters"]
    base, tokenizer, _ = _base(storage, base_path)
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
    return Plan(model, objective, train_config(spec), tokenizer, label_names=list(data.label_names), lora=lora)


def _plan_instruct(job: Job, storage: DataDir, corpora: dict, base_path: str) -> Plan:
    spec, hp = job.spec, job.spec["hyperparameters"]
    model, tokenizer, _ = _base(storage, base_path)
    records = read_instruction_file(storage.corpus_file(job.corpus_id, corpora[job.corpus_id]))
    if job.validation_corpus_id:
        val_records = read_instruction_file(storage.corpus_file(job.validation_corpus_id,
                                                                corpora[job.validation_corpus_id]))
    else:
        n_val = max(1, int(len(records) * spec["validation_fraction"]))
        if len(records) - n_val < 1:
            raise ValueError(f"{len(records)} instruction record(s) cannot be split into training and validation")
        order = np.random.default_rng(job.seed).permutation(len(records))
        val_records = [records[i] for i in order[:n_val]]
        records = [records[i] for i in order[n_val:]]
    max_length = min(hp["max_length"] or model.config.context_length, model.config.context_length)
    objective = InstructionObjective([encode_instruction(r, tokenizer) for r in records],
                                     [encode_instruction(r, tokenizer) for r in val_records],
                                     batch_size=hp["batch_size"],
                                     seed=job.seed, pad_id=tokenizer.eot_id, max_length=max_length,
                                     mask_prompt=spec["mask_prompt"])
    lora = _lora(spec)
    if lora is not None:
        apply_lora(model, lora)
    return Plan(model, objective, train_config(spec), tokenizer, lora=lora, prompt_format=PROMPT_FORMAT)


def plan_job(job: Job, storage: DataDir, corpora: dict[str, str], base_path: str | None) -> Plan:
    """corpora maps the job's corpus ids to their formats; base_path is the base checkpoint's directory
    relative to the data dir (finetunes)."""
    work = storage.job_work_dir(job.id)
    work.mkdir(parents=True, exist_ok=True)
    if job.type == JobType.PRETRAIN:
        return _plan_pretrain(job, storage, corpora, work)
    if job.type == JobType.FINETUNE_CLASSIFIER:
        return _plan_classifier(job, storage, corpora, base_path)
    return _plan_instruct(job, storage, corpora, base_path)
