from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.schemas.common import Strict, one_of
from core.jobs import TRAINING, JobStatus, JobType
from model import LoRAConfig, TrainConfig
from model.config import MLPS, NORMS, POSITIONS
from model.dpo import LEARNING_RATE as DPO_LEARNING_RATE
from model.lora import LORA_TARGETS
from model.parallel import micro_batches
from model.trainer import OPTIMIZERS, SCHEDULES

TrainingJobType = one_of(*TRAINING)
LANGUAGE_FINETUNES = (JobType.FINETUNE_INSTRUCT, JobType.FINETUNE_DPO)  # whose model stays a language model
JobTypeName = one_of(*JobType)  # evaluate jobs are created by POST /v1/evaluations
JobStatusName = one_of(*JobStatus)
TRAIN = TrainConfig()  # the library's defaults are the API's
LORA = LoRAConfig()


class ModelSpec(Strict):
    """A preset and the fields that override it."""

    preset: str = Field("nano", description="a name of GET /v1/jobs/presets: GPT-2's family, or llama-* and qwen3-*")
    n_layer: int | None = Field(None, ge=1, le=128)
    n_head: int | None = Field(None, ge=1, le=128)
    n_embd: int | None = Field(None, ge=1, le=16384)
    context_length: int | None = Field(None, ge=2, le=32768)
    dropout: float | None = Field(None, ge=0, lt=1)
    qkv_bias: bool | None = None
    tie_embeddings: bool | None = Field(None, description="false: a separate output layer, as in the book")
    position: one_of(*POSITIONS) | None = Field(None, description="learned (GPT-2), or rope: rotary embeddings")
    rope_theta: float | None = Field(None, gt=0, le=1e9)
    norm: one_of(*NORMS) | None = Field(None, description="layernorm (GPT-2), or rmsnorm")
    mlp: one_of(*MLPS) | None = Field(None, description="gelu (GPT-2), or swiglu")
    mlp_hidden: int | None = Field(None, ge=1, le=131072, description="the MLP's hidden width; default by mlp")
    n_kv_head: int | None = Field(None, ge=1, le=128, description="key/value heads (grouped-query attention); "
                                                                  "default n_head")
    qk_norm: bool | None = Field(None, description="RMSNorm on each head's queries and keys (Qwen3)")

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}


class BPESpec(Strict):
    type: Literal["bpe"]
    vocab_size: int = Field(ge=257, le=200_000)


class LoRASpec(Strict):
    # model.LoRAConfig's fields and defaults

    rank: int = Field(LORA.rank, ge=1, le=512)
    alpha: float = Field(LORA.alpha, gt=0)
    targets: list[one_of(*LORA_TARGETS)] = Field(default=list(LORA.targets), min_length=1)
    dropout: float = Field(LORA.dropout, ge=0, lt=1)


class Hyperparameters(Strict):
    # model.TrainConfig's fields and defaults (but the device, which the worker picks, and Adam's betas), and
    # those of the training data: batch size, windows, lengths

    max_steps: int | None = Field(None, ge=1, le=10_000_000, description=(
        f"optimizer steps; default {TRAIN.max_steps} unless epochs is given"))
    epochs: float | None = Field(None, gt=0, le=100_000, description=(
        "instead of max_steps: passes over the training split (its records, its strided windows, or as many tokens "
        "as it holds); the worker turns them into steps once it has read the data"))
    batch_size: int = Field(8, ge=1, le=4096)
    learning_rate: float = Field(TRAIN.learning_rate, gt=0, le=1, description=(
        f"the peak learning rate (AdamW's); finetune_dpo's default is {DPO_LEARNING_RATE}"))
    min_learning_rate: float | None = Field(TRAIN.min_learning_rate, ge=0)
    warmup_steps: int = Field(TRAIN.warmup_steps, ge=0)
    weight_decay: float = Field(TRAIN.weight_decay, ge=0, le=10)
    grad_clip: float | None = Field(TRAIN.grad_clip, gt=0)
    grad_accum_steps: int = Field(TRAIN.grad_accum_steps, ge=1, le=1024)
    eval_interval: int = Field(TRAIN.eval_interval, ge=0, description="0: evaluate only at the end")
    eval_batches: int = Field(TRAIN.eval_batches, ge=1, le=10_000)
    patience: int | None = Field(TRAIN.patience, ge=1, le=100_000, description=(
        "stop early once this many evaluations in a row found no lower val_loss (the job succeeds; its best "
        "checkpoint is kept: keep_checkpoints); default: never"))
    checkpoint_interval: int = Field(TRAIN.checkpoint_interval, ge=0, description="0: checkpoint only at the end")
    sample_interval: int = Field(TRAIN.sample_interval, ge=0)
    sample_prompt: str = Field(TRAIN.sample_prompt, max_length=2000)
    sample_tokens: int = Field(TRAIN.sample_tokens, ge=1, le=1000)
    block_size: int | None = Field(None, ge=1, description="pretraining window; default: the context length")
    stride: int | None = Field(None, ge=1, description="pretraining: strided windows in epochs (the book)")
    max_length: int | None = Field(None, ge=2, description="finetuning: texts truncated to this many tokens")
    compile: bool = TRAIN.compile
    optimizer: one_of(*OPTIMIZERS) = Field(TRAIN.optimizer, description=(
        "adamw, or muon: Muon for the blocks' weight matrices (at muon_learning_rate), AdamW for the rest"))
    muon_learning_rate: float = Field(TRAIN.muon_learning_rate, gt=0, le=1)
    schedule: one_of(*SCHEDULES) = Field(TRAIN.schedule, description=(
        "after the warmup: cosine to min_learning_rate, wsd (constant, then a linear decay over the last "
        "decay_fraction of the steps), or constant"))
    decay_fraction: float = Field(TRAIN.decay_fraction, gt=0, le=1)

    @model_validator(mode="after")
    def _consistent(self):
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("give max_steps or epochs, not both")
        if self.epochs is None and self.max_steps is None:
            self.max_steps = TRAIN.max_steps
        # the library's rules between fields, in its words (a run of epochs has at least one step)
        TrainConfig.from_values({**self.model_dump(), "max_steps": self.max_steps or 1})
        return self


class JobCreate(Strict):
    type: TrainingJobType
    name: str | None = Field(None, max_length=200)
    corpus_id: str = Field(max_length=40)
    validation_corpus_id: str | None = Field(None, max_length=40)
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    base_checkpoint_id: str | None = Field(None, max_length=40, description=(
        "finetunes: the checkpoint they start from; pretrain: continue pretraining this language model checkpoint "
        "on the corpus (its model and tokenizer; without it, a new model)"))
    model: ModelSpec | None = None
    tokenizer: Literal["gpt2"] | BPESpec | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    trainable_blocks: int = Field(1, ge=0, description="classifier: blocks trained from the top")
    lora: LoRASpec | None = None
    adapter_only: bool = Field(False, description=(
        "finetune_instruct with lora: checkpoints hold LoRA's tensors alone (kilobytes to megabytes, not the whole "
        "model); they load over the base checkpoint, and a deployment of the base serves them per request"))
    mask_prompt: bool = False
    dpo_beta: float = Field(0.1, gt=0, le=100, description=(
        "finetune_dpo: how far the tuned model may move from its base (DPO's beta: the larger, the closer it stays)"))
    keep_checkpoints: int | None = Field(None, ge=0, le=100_000, description=(
        "keep the newest N checkpoints and the best by validation loss, deleting the others as training goes (0: "
        "keep all); older ones drop their optimizer state either way. Default: the service's checkpoints_kept"))
    seed: int = Field(1, ge=0, le=2**31 - 1)
    devices: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(1, description=(
        "processes training the job together (torch.distributed): GPUs of the worker, or CPU processes on a "
        "worker without GPUs; auto: every GPU of the worker that the gradient accumulation divides among. The "
        "devices share each step's grad_accum_steps micro-batches, so the global batch stays batch_size x "
        "grad_accum_steps"))

    nodes: int = Field(1, ge=1, le=64, description=(
        "machines training the job together (torch.distributed's rendezvous): a worker on each takes a part and "
        "runs `devices` ranks of it; every worker needs SCRATCHLLM_NODE_ADDRESS and the same data folder "
        "(docs/DEPLOY.md). The global batch stays batch_size x grad_accum_steps"))

    @model_validator(mode="after")
    def _devices_share_the_accumulation(self):
        if self.nodes > 1 and self.devices == "auto":
            raise ValueError("a job on several nodes gives its devices per node as a number, not auto")
        if self.devices != "auto":  # its error names both
            micro_batches(0, self.hyperparameters.grad_accum_steps, 0, self.devices * self.nodes)
        return self

    @model_validator(mode="after")
    def _fields_of_the_type(self):
        if self.type == JobType.PRETRAIN and self.lora is not None:
            raise ValueError("lora is for finetunes")
        if self.type == JobType.PRETRAIN and self.base_checkpoint_id is None:
            self.model = self.model or ModelSpec()
            self.tokenizer = self.tokenizer or "gpt2"
        else:
            if self.base_checkpoint_id is None:
                raise ValueError(f"{self.type} needs base_checkpoint_id")
            if self.model is not None or self.tokenizer is not None:
                what = "continued pretraining" if self.type == JobType.PRETRAIN else "a finetune"
                raise ValueError(f"{what} keeps its base checkpoint's model and tokenizer: drop model and "
                                 f"tokenizer")
        if self.type == JobType.FINETUNE_DPO and "learning_rate" not in self.hyperparameters.model_fields_set:
            self.hyperparameters.learning_rate = DPO_LEARNING_RATE
        if self.adapter_only and (self.type not in LANGUAGE_FINETUNES or self.lora is None):
            # a classifier's new head is no adapter a language model's deployment could serve
            raise ValueError(f"adapter_only is for {' and '.join(LANGUAGE_FINETUNES)} jobs with lora")
        return self


class JobEstimate(BaseModel):
    object: Literal["job.estimate"] = "job.estimate"
    parameters: int
    memory_bytes: int = Field(description="weights, gradients, AdamW state and one step's activations (estimated)")
    memory_limit_bytes: int
    tokens_per_step: int = Field(description="batch_size x grad_accum_steps x window (at most, for finetunes)")
    steps: int = Field(description="max_steps, or the steps epochs come to, estimated from the corpus's size")
    fits: bool
    refusal: str | None = Field(description="why POST /v1/jobs would refuse it, if it would")


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
    type: JobTypeName
    status: JobStatusName
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
    if job.type == JobType.EVALUATE:
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
    has_more: bool = Field(description="more points follow: ask again with since_step one past the last step")


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    object: Literal["job.event"] = "job.event"
    time: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None
