from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from app.schemas.checkpoints import CheckpointTaskName
from app.schemas.common import one_of
from core.enums import ServingDtype
from serving.deployments import DeploymentState
from serving.placement import DEVICE_PATTERN

ServingDtypeName = one_of(*ServingDtype)
DEVICE_HELP = "auto (the first CUDA device when there is one, else the CPU), cpu, cuda or cuda:N"
DTYPE_HELP = "auto (bfloat16 on a GPU that supports it, else float32), float32, bfloat16 or float16"

DEPLOYMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # no colon: it parts a deployment from its adapter
MAX_ADAPTERS = 64
Adapters = dict[Annotated[str, StringConstraints(pattern=DEPLOYMENT_NAME)], Annotated[str, Field(max_length=40)]]
ADAPTERS_HELP = ("LoRA adapters served over the checkpoint, by name: adapter-only checkpoints trained on it (their "
                 "adapter_of_id). A request chooses one with the model `<deployment>:<adapter>`, or the adapter's "
                 "name alone where no deployment has that name and no other deployment an adapter of that name; "
                 "requests for different adapters decode in the same batch")


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(pattern=DEPLOYMENT_NAME)
    checkpoint_id: str = Field(max_length=40)
    default: bool = False
    device: str = Field("auto", pattern=DEVICE_PATTERN, description=DEVICE_HELP)
    dtype: ServingDtypeName = Field(ServingDtype.AUTO, description=DTYPE_HELP)
    adapters: Adapters = Field(default_factory=dict, max_length=MAX_ADAPTERS, description=ADAPTERS_HELP)


class DeploymentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    checkpoint_id: str | None = Field(None, max_length=40)
    default: bool | None = None
    device: str | None = Field(None, pattern=DEVICE_PATTERN, description=DEVICE_HELP)
    dtype: ServingDtypeName | None = Field(None, description=DTYPE_HELP)
    adapters: Adapters | None = Field(None, max_length=MAX_ADAPTERS, description=(
        f"{ADAPTERS_HELP}. Replaces the deployment's adapters; {{}} drops them all"))


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
    adapters: dict[str, str]  # as asked for: adapter name -> checkpoint id
    serving_adapters: dict[str, str] | None  # what this API process serves now
    state: one_of(*DeploymentState)
    error: str | None
    created_at: datetime
    updated_at: datetime
