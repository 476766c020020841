from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.checkpoints import CheckpointTaskName
from app.schemas.common import one_of
from serving.deployments import DeploymentState

DEPLOYMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=DEPLOYMENT_NAME)
    checkpoint_id: str = Field(max_length=40)
    default: bool = False


class DeploymentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    checkpoint_id: str | None = Field(None, max_length=40)
    default: bool | None = None


class DeploymentOut(BaseModel):
    id: str
    object: Literal["deployment"] = "deployment"
    name: str
    checkpoint_id: str
    serving_checkpoint_id: str | None  # what this API process serves now (the old one while a new one loads)
    task: CheckpointTaskName
    default: bool
    state: one_of(*DeploymentState)
    error: str | None
    created_at: datetime
    updated_at: datetime
