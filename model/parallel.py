"""Data parallelism for the Trainer, on the process group torch.distributed was initialized with (if any).

Every rank runs the same Trainer. An optimizer step's micro-batches are shared out: rank r trains on the r-th
contiguous share of the step's grad_accum_steps global micro-batch indices, and DDP averages the gradients.
So N ranks take exactly the steps one process takes with the same global batch, up to float summation order.
"""

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of ranks): (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def micro_batches(step: int, grad_accum_steps: int, rank: int, world: int) -> range:
    """The global micro-batch indices a rank trains on at optimizer step `step`."""
    if grad_accum_steps % world:
        raise ValueError(f"grad_accum_steps ({grad_accum_steps}) must be a multiple of the number of devices "
                         f"({world}): the devices share each step's micro-batches")
    share = grad_accum_steps // world
    first = step * grad_accum_steps + rank * share
    return range(first, first + share)


def _collective_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over the ranks (float64)."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(device))
    dist.all_reduce(tensor)
    return tensor.tolist()


def agree(flag: bool, device: torch.device) -> bool:
    """Rank 0's flag, on every rank: a decision only rank 0 can make (stop: cancelled, lease lost)."""
    tensor = torch.tensor([int(flag)], device=_collective_device(device))
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def gather(value) -> list:
    """Every rank's value (a picklable object), in rank order, on every rank."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values
