from datetime import datetime
from typing import Any, Literal

from pydantic import AnyHttpUrl, BaseModel, Field

from app.schemas.common import Strict, one_of
from app.schemas.jobs import JobStatusName
from core.enums import EvaluationKind

EvaluationKindName = one_of(*EvaluationKind)


class JudgeSpec(Strict):
    """An OpenAI-compatible chat endpoint that rates each response 0-100 (the book's chapter-7 method)."""

    url: AnyHttpUrl = Field(description=(
        "the API's base URL, e.g. https://api.openai.com/v1, without a query, fragment or user:password@; a host "
        "of the server's own network (this service at localhost:8000/v1, an Ollama) only if the server allows it "
        "(SCRATCHLLM_JUDGE_ALLOWED_HOSTS)"))
    model: str = Field(min_length=1, max_length=200)
    api_key: str | None = Field(None, max_length=500,
                                description="sent as a bearer token; stored encrypted and never shown again")
    timeout_s: float = Field(60.0, gt=0, le=600)


class EvaluationCreate(Strict):
    checkpoint_id: str = Field(max_length=40)
    corpus_id: str = Field(max_length=40)
    batch_size: int = Field(8, ge=1, le=128)
    # language models on text
    block_size: int | None = Field(None, ge=1, description="tokens per scoring window; default min(128, context)")
    stride: int | None = Field(None, ge=1, description="window step; default block_size / 2")
    max_tokens: int | None = Field(None, ge=2, description="score only the corpus's first max_tokens tokens")
    # classifiers and instruction models
    max_examples: int | None = Field(None, ge=1, description="score only the corpus's first max_examples records")
    worst_examples: int = Field(10, ge=0, le=1000, description="how many of the worst-scored records `details` shows")
    max_length: int | None = Field(None, ge=1, description=(
        "classifier: texts truncated to this many tokens; preference: each prompt and response to this many"))
    max_new_tokens: int = Field(128, ge=1, le=4096, description="instruct: the longest generated response")
    judge: JudgeSpec | None = None


class EvaluationProgress(BaseModel):
    step: int
    total_steps: int


class EvaluationOut(BaseModel):
    id: str
    object: Literal["evaluation"] = "evaluation"
    job_id: str
    status: JobStatusName
    progress: EvaluationProgress
    error: str | None
    checkpoint_id: str | None  # None once the checkpoint was deleted; the numbers stay
    corpus_id: str
    kind: EvaluationKindName
    settings: dict[str, Any]
    metrics: dict[str, int | float] | None
    details: dict[str, Any] | None
    created_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, evaluation) -> "EvaluationOut":
        job = evaluation.job
        return cls(id=evaluation.id, job_id=job.id, status=job.status,
                   progress=EvaluationProgress(step=job.step, total_steps=job.total_steps), error=job.error,
                   checkpoint_id=evaluation.checkpoint_id, corpus_id=evaluation.corpus_id, kind=evaluation.kind,
                   settings=evaluation.settings, metrics=evaluation.metrics, details=evaluation.details,
                   created_at=evaluation.created_at, finished_at=evaluation.finished_at)


class ExampleOut(BaseModel):
    position: int
    score: float
    data: dict[str, Any]


class ExamplePage(BaseModel):
    object: Literal["list"] = "list"
    data: list[ExampleOut]
    has_more: bool


class ComparisonRow(BaseModel):
    evaluation_id: str
    status: JobStatusName
    checkpoint_id: str | None
    checkpoint_step: int | None
    training_job_id: str | None
    corpus_id: str
    kind: EvaluationKindName
    settings: dict[str, Any]
    metrics: dict[str, int | float] | None


class Comparison(BaseModel):
    object: Literal["evaluation.comparison"] = "evaluation.comparison"
    metrics: list[str]  # the columns: every metric of the rows, scores first
    rows: list[ComparisonRow]
    best: dict[str, str]  # score metric -> the evaluation id that does best on it
    comparable: bool  # same corpus, kind and settings: the numbers measure the same thing
    notes: list[str]
