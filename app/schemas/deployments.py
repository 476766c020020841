from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.checkpoints import CheckpointTaskName
from app.schemas.common import one_of
from core.enums import ServingDtype
from serving.deployments import DeploymentState
from serving.placement import DEVICE_PATTERN

ServingDtypeName = one_of(*ServingDtype)
DEVICE_HELP = "auto (the first CUDA device when there is one, else the CPU), cpu, cuda or cuda:N"
DTYPE_HELP = "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16"

DEPLOYMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=DEPLOYMENT_NAME)
    checkpoint_id: str = Field(max_length=40)
    default: bool = False
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=DEVICE_HELP)
    dtype: ServingDtypeName = Field(ServingDtype.AUTO, description=DTYPE_HELP)


class DeploymentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    checkpoint_id: str | None = Field(None, max_length=40)
    default: bool | None = None
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description=DEVICE_HELP)
    dtype: ServingDtypeName | None = Field(None, description=DTYPE_HELP)


class DeploymentOut(BaseModel):
    id: str
    object: Literal["deployment"] = "deployment"
    name: str
    checkpoint_id: str
    serving_checkpoint_id: str | None  # what this API process serves now (the old one while a new one loads)
    task: CheckpointTaskName
    default: bool
    device: str  # as asked for
    dtype: ServingDtypeName
    served_device: str | None  # what this API process serves it on now, `auto` resolved
    served_dtype: str | None
    state: one_of(*DeploymentState)
    error: str | None
    created_at: datetime
    updated_at: datetime
