"""Where a deployment runs: a device and a dtype. The deployments table holds what was asked for (`auto` or
explicit); each API process resolves it on its own hardware, and budgets memory per device it serves on."""

from dataclasses import dataclass

import torch

from core.enums import ServingDtype
from model.linear import packable
from model.memory import human_bytes

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,2})?)$"  # auto: the first CUDA device when there is one, else the CPU
TORCH_DTYPES = {ServingDtype.FLOAT32: torch.float32, ServingDtype.BFLOAT16: torch.bfloat16,
                ServingDtype.FLOAT16: torch.float16}


class PlacementError(ValueError):
    """The device asked for is not on this machine."""


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def dtype_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    @property
    def packs_weights(self) -> bool:
        """Whether the engine keeps a second, oneDNN copy of the weights for batches (model.linear.pack)."""
        return packable(self.device, self.dtype)

    def __str__(self) -> str:
        return f"{self.device} {self.dtype_name}"


def resolve(device: str = "auto", dtype: str = ServingDtype.AUTO) -> Placement:
    """The placement on this machine; PlacementError if the device asked for is not here."""
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        device = "cuda:0" if cuda_devices else "cpu"
    kind, _, index = device.partition(":")
    target = torch.device(kind, int(index or 0)) if kind == "cuda" else torch.device(kind)  # cuda:02 is cuda:2
    if target.type == "cuda" and target.index >= cuda_devices:
        raise PlacementError(f"device {device!r} is not on this machine: it has "
                             f"{cuda_devices or 'no'} CUDA device{'' if cuda_devices == 1 else 's'}")
    if dtype == ServingDtype.AUTO:
        bf16 = target.type == "cuda" and torch.cuda.is_bf16_supported()
        return Placement(target, torch.bfloat16 if bf16 else torch.float32)
    return Placement(target, TORCH_DTYPES[ServingDtype(dtype)])


def device_memory_bytes(device: torch.device) -> int:
    """The total memory of a CUDA device."""
    return torch.cuda.get_device_properties(device).total_memory


@dataclass(frozen=True)
class Budget:
    """The memory the deployments on one device may hold together, and the setting it comes from."""

    bytes: int
    source: str

    @classmethod
    def of(cls, placement: Placement, max_cpu_bytes: int, gpu_fraction: float) -> "Budget":
        if placement.device.type == "cpu":
            return cls(max_cpu_bytes, "max_serving_memory_bytes")
        total = device_memory_bytes(placement.device)
        return cls(int(total * gpu_fraction), f"serving_gpu_memory_fraction {gpu_fraction} of "
                                             f"{placement.device}'s {human_bytes(total)}")
