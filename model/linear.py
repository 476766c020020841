"""Linear layers whose products for a few rows (a decode step) use every CPU thread.

A decode step multiplies one vector per sequence by each weight matrix, and its time is the time to read
the matrices. On CPU, torch runs such a thin product on one core, which reads memory at about half the
rate two cores do. Splitting the weight's rows into one block per thread and multiplying the blocks with
bmm spreads them over the threads: the block linears of the `small` preset read at ~23 GB/s instead of
~12 on two cores (and at 8 sequences the step is ~1.4x faster too). The blocks are views of the weight,
so nothing is copied; the values equal F.linear's up to float rounding.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEW_ROWS = 32  # up to here the row blocks were measured faster; past it both run at the same speed


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


def uses_row_blocks(x: Tensor, weight: Tensor) -> bool:
    """Whether x [..., in] times weight takes row_block_matmul: a CPU inference product of few rows."""
    rows = x.numel() // x.shape[-1]
    return x.is_cpu and rows <= FEW_ROWS and weight.is_contiguous() and not torch.is_grad_enabled()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear, with a CPU inference product of up to FEW_ROWS rows split over the threads."""
    if not uses_row_blocks(x, weight):
        return F.linear(x, weight, bias)
    y = row_block_matmul(weight, x.reshape(-1, x.shape[-1]).t(), bias)  # [out, N]
    return y.t().contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) whose forward is `linear` above."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
