from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import one_of
from core.enums import CheckpointSource, CheckpointTask

CheckpointTaskName = one_of(*CheckpointTask)


class CheckpointOut(BaseModel):
    id: str
    object: Literal["checkpoint"] = "checkpoint"
    job_id: str | None
    step: int
    task: CheckpointTaskName
    label_names: list[str] | None
    metrics: dict[str, float]
    architecture: dict[str, Any]  # the GPTConfig of the model
    tokenizer_type: str
    prompt_format: str | None
    parent_id: str | None
    adapter_of_id: str | None = Field(description=(
        "adapter-only checkpoints (LoRA's tensors alone): the checkpoint they load over, and the one whose "
        "deployments can serve them as adapters"))
    source: one_of(*CheckpointSource)
    size_bytes: int
    created_at: datetime

    @classmethod
    def of(cls, checkpoint) -> "CheckpointOut":
        return cls(id=checkpoint.id, job_id=checkpoint.job_id, step=checkpoint.step, task=checkpoint.task,
                   label_names=checkpoint.label_names, metrics=checkpoint.metrics,
                   architecture=checkpoint.model_config, tokenizer_type=checkpoint.tokenizer_type,
                   prompt_format=checkpoint.prompt_format, parent_id=checkpoint.parent_id,
                   adapter_of_id=checkpoint.adapter_of_id, source=checkpoint.source,
                   size_bytes=checkpoint.size_bytes, created_at=checkpoint.created_at)
