"""Linear layers with fast CPU inference for the shapes of decoding: one row, or a batch of a few rows.

A decode step multiplies one vector per sequence by each weight matrix. On CPU, torch's own kernels are
slow at these thin shapes, and for two reasons:
- one row: torch runs the matrix-vector product on one core, which reads memory at about half the rate
  two cores do. Splitting the weight's rows into one block per thread and multiplying the blocks with bmm
  spreads them over the threads: the block linears of `small` read at ~23 GB/s instead of ~12 on two
  cores. The blocks are views of the weight: nothing is copied.
- several rows: the BLAS re-packs the weight on every call. oneDNN can keep a copy of the weight in the
  layout its kernels read (`pack`, the op torch.compile's CPU freezing uses): the matmuls of a `small`
  decode step run 1.6-2.4x faster than row blocks at 4-32 sequences, and 64-256-row prefills 1.4-1.6x
  faster than F.linear. The copy doubles the weights' memory, so only models kept for batched
  serving are packed (`GPT.pack_for_batches`, `pack_linears`).
Values equal F.linear's up to float rounding. Training (autograd) always takes F.linear.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEW_ROWS = 32  # row blocks beat F.linear up to here; past it both run at the same speed
# oneDNN's layout for 8 rows ran 2-16 rows within 6% of its layout for 32 (32 rows 17% slower); its layout
# for 1 row ran 8 rows 2x slower
PACKED_FOR_ROWS = 8


class PackedWeight(NamedTuple):
    """A oneDNN copy of a weight; valid while the weight keeps the storage and version it was copied from."""

    tensor: Tensor
    data_ptr: int
    version: int

    def matches(self, weight: Tensor) -> bool:
        return self.data_ptr == weight.data_ptr() and self.version == weight._version


def packable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `pack` keeps a copy of a weight on this device in this dtype."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack(weight: Tensor) -> PackedWeight | None:
    """weight [out, in] in oneDNN's layout for products of several rows; None where oneDNN cannot."""
    if not packable(weight.device, weight.dtype) or weight.is_inference():
        return None  # (an inference tensor has no version to tell when the copy goes stale)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS)
    except (AttributeError, RuntimeError):  # a torch build without this private op
        return None
    return PackedWeight(packed, weight.data_ptr(), weight._version)


def packed_linear(x: Tensor, packed: PackedWeight, bias: Tensor | None = None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed.tensor, bias, "none", [], "")


def row_block_matmul(weight: Tensor, columns: Tensor, bias: Tensor | None = None) -> Tensor:
    """weight [out, in] @ columns [in, N] (+ bias [out] on every column) -> [out, N], one row block per thread."""
    out_features, in_features = weight.shape
    n_blocks = torch.get_num_threads()
    block = out_features // n_blocks
    split = n_blocks * block
    y = columns.new_empty(out_features, columns.shape[1])
    weight_blocks = weight[:split].view(n_blocks, block, in_features)
    y_blocks = y[:split].view(n_blocks, block, -1)  # written in place: no copy to join the blocks
    columns_per_block = columns.expand(n_blocks, -1, -1)
    if bias is None:
        torch.bmm(weight_blocks, columns_per_block, out=y_blocks)
    else:
        torch.baddbmm(bias[:split].view(n_blocks, block, 1), weight_blocks, columns_per_block, out=y_blocks)
    if split < out_features:  # the few rows left over when the threads do not divide out
        torch.mm(weight[split:], columns, out=y[split:])
        if bias is not None:
            y[split:] += bias[split:, None]
    return y


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: PackedWeight | None = None) -> Tensor:
    """F.linear; in CPU inference, several rows through a matching packed copy, or few rows as row blocks."""
    if not x.is_cpu or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    rows = x.numel() // x.shape[-1]
    if rows > 1 and packed is not None and packed.matches(weight):
        return packed_linear(x, packed, bias)
    if 0 < rows <= FEW_ROWS and weight.is_contiguous():
        y = row_block_matmul(weight, x.reshape(-1, x.shape[-1]).t(), bias)  # [out, N]
        return y.t().contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def pack_linears(module: nn.Module) -> None:
    """Pack the weight of every Linear in module (see pack)."""
    for child in module.modules():
        if isinstance(child, Linear):
            child.pack()


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear` above."""

    packed: PackedWeight | None = None

    def pack(self) -> None:
        self.packed = pack(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)
