from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TrainingJobType = Literal["pretrain", "finetune_classifier", "finetune_instruct"]
JobType = TrainingJobType | Literal["evaluate"]  # evaluate jobs are created by POST /v1/evaluations
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
CORPUS_KIND_OF = {"pretrain": "text", "finetune_classifier": "classification", "finetune_instruct": "instruction"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSpec(Strict):
    """A preset and the fields that override it."""

    preset: str = "nano"
    n_layer: int | None = Field(None, ge=1, le=128)
    n_head: int | None = Field(None, ge=1, le=128)
    n_embd: int | None = Field(None, ge=1, le=16384)
    context_length: int | None = Field(None, ge=2, le=32768)
    dropout: float | None = Field(None, ge=0, lt=1)
    qkv_bias: bool | None = None
    tie_embeddings: bool | None = Field(None, description="false: a separate output layer, as in the book")

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}


class BPESpec(Strict):
    type: Literal["bpe"]
    vocab_size: int = Field(ge=257, le=200_000)


class LoRASpec(Strict):
    rank: int = Field(8, ge=1, le=512)
    alpha: float = Field(16.0, gt=0)
    targets: list[Literal["c_attn", "c_proj", "c_fc"]] = Field(default=["c_attn", "c_proj", "c_fc"], min_length=1)
    dropout: float = Field(0.0, ge=0, lt=1)


class Hyperparameters(Strict):
    max_steps: int = Field(200, ge=1, le=10_000_000)
    batch_size: int = Field(8, ge=1, le=4096)
    learning_rate: float = Field(6e-4, gt=0, le=1)
    min_learning_rate: float | None = Field(None, ge=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.1, ge=0, le=10)
    grad_clip: float | None = Field(1.0, gt=0)
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    eval_interval: int = Field(50, ge=0, description="0: evaluate only at the end")
    eval_batches: int = Field(10, ge=1, le=10_000)
    checkpoint_interval: int = Field(100, ge=0, description="0: checkpoint only at the end")
    sample_interval: int = Field(0, ge=0)
    sample_prompt: str = Field("\n", max_length=2000)
    sample_tokens: int = Field(40, ge=1, le=1000)
    block_size: int | None = Field(None, ge=1, description="pretraining window; default: the context length")
    stride: int | None = Field(None, ge=1, description="pretraining: strided windows in epochs (the book)")
    max_length: int | None = Field(None, ge=2, description="finetuning: texts truncated to this many tokens")
    compile: bool = False

    @model_validator(mode="after")
    def _consistent(self):
        if self.min_learning_rate is not None and self.min_learning_rate > self.learning_rate:
            raise ValueError("min_learning_rate must not exceed learning_rate")
        return self


class JobCreate(Strict):
    type: TrainingJobType
    name: str | None = Field(None, max_length=200)
    corpus_id: str = Field(max_length=40)
    validation_corpus_id: str | None = Field(None, max_length=40)
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    base_checkpoint_id: str | None = Field(None, max_length=40)
    model: ModelSpec | None = None
    tokenizer: Literal["gpt2"] | BPESpec | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    trainable_blocks: int = Field(1, ge=0, description="classifier: blocks trained from the top")
    lora: LoRASpec | None = None
    mask_prompt: bool = False
    seed: int = Field(1, ge=0, le=2**31 - 1)

    @model_validator(mode="after")
    def _fields_of_the_type(self):
        if self.type == "pretrain":
            if self.base_checkpoint_id is not None:
                raise ValueError("pretraining starts from scratch: base_checkpoint_id is for finetunes")
            if self.lora is not None:
                raise ValueError("lora is for finetunes")
            self.model = self.model or ModelSpec()
            self.tokenizer = self.tokenizer or "gpt2"
        else:
            if self.base_checkpoint_id is None:
                raise ValueError(f"{self.type} needs base_checkpoint_id")
            if self.model is not None or self.tokenizer is not None:
                raise ValueError("a finetune keeps its base checkpoint's model and tokenizer: drop model and "
                                 "tokenizer")
        return self


class Progress(BaseModel):
    step: int
    total_steps: int
    tokens_seen: int
    tokens_per_s: float | None
    eta_s: float | None
    train_loss: float | None
    val_loss: float | None


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    name: str | None
    type: JobType
    status: JobStatus
    corpus_id: str
    validation_corpus_id: str | None
    base_checkpoint_id: str | None
    seed: int
    spec: dict[str, Any]
    progress: Progress
    error: str | None
    cancel_requested: bool
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: dict[str, str]

    @classmethod
    def of(cls, job) -> "JobOut":
        return cls(id=job.id, name=job.name, type=job.type, status=job.status, corpus_id=job.corpus_id,
                   validation_corpus_id=job.validation_corpus_id, base_checkpoint_id=job.base_checkpoint_id,
                   seed=job.seed, spec=public_spec(job.spec), error=job.error, cancel_requested=job.cancel_requested,
                   attempts=job.attempts, created_at=job.created_at, started_at=job.started_at,
                   finished_at=job.finished_at, links=_links(job),
                   progress=Progress(step=job.step, total_steps=job.total_steps, tokens_seen=job.tokens_seen,
                                     tokens_per_s=job.tokens_per_s, eta_s=job.eta_s, train_loss=job.train_loss,
                                     val_loss=job.val_loss))


def public_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec without secrets: a judge's API key is used by the worker and never shown."""
    judge = spec.get("judge")
    if not judge or judge.get("api_key") is None:
        return spec
    return {**spec, "judge": {**judge, "api_key": "(set)"}}


def _links(job) -> dict[str, str]:
    if job.type == "evaluate":
        return {"evaluation": f"/v1/evaluations?job_id={job.id}"}
    # a training job's checkpoints scored on its validation corpus, when it has one
    on_validation = f"&corpus_id={job.validation_corpus_id}" if job.validation_corpus_id else ""
    return {"checkpoints": f"/v1/checkpoints?job_id={job.id}",
            "evaluations": f"/v1/evaluations?training_job_id={job.id}{on_validation}"}


class MetricPoint(BaseModel):
    step: int
    value: float
    time: datetime


class MetricSeries(BaseModel):
    object: Literal["metrics"] = "metrics"
    job_id: str
    name: str
    data: list[MetricPoint]


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    object: Literal["job.event"] = "job.event"
    time: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None
