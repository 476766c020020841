"""Cross-entropy over a large vocabulary, with a backward pass that touches the logits as little as possible.

F.cross_entropy keeps a log-softmax copy of the logits, zero-fills another logits-sized tensor in the
NLL backward and reads both in the log-softmax backward: with GPT-2's 50,257-token vocabulary those
passes over fresh memory take a sizeable share of a CPU training step. Here the forward keeps only the
logits, and the backward is softmax(logits) - one_hot(target): one softmax pass and an in-place scale.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_LOG_PERPLEXITY = 700.0  # e^700 is about 1e304: past it a float overflows


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
        # logits [N, V] fp32, targets [N]
        valid = targets != ignore_index
        n_valid = valid.sum().clamp(min=1)
        safe_targets = targets.masked_fill(~valid, 0)
        # log_softmax is one fused pass (logsumexp is slower); its output is dropped at once
        picked = torch.log_softmax(logits, dim=-1).gather(1, safe_targets[:, None]).squeeze(1)
        ctx.save_for_backward(logits, safe_targets, valid, n_valid)
        return -(picked * valid).sum() / n_valid

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, targets, valid, n_valid = ctx.saved_tensors
        grad = torch.softmax(logits, dim=-1)  # [N, V]
        grad[torch.arange(len(targets), device=grad.device), targets] -= 1.0
        grad.mul_((valid.to(grad.dtype) * (grad_loss / n_valid))[:, None])  # ignored targets: 0
        return grad, None, None


def cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy of logits [N, V] against targets [N] over the targets that are not
    ignore_index; equals F.cross_entropy, but 0 rather than NaN when all are ignored. Computed in fp32.

    The hand-written backward is for eager CPU training. Under torch.compile, and on a GPU, the library's
    cross-entropy is used instead: the compiler fuses it with the softmax (the hand-written version made a
    compiled CPU step about 10% slower than plain F.cross_entropy), and CUDA has its own fused kernels."""
    logits = logits.float()
    if logits.is_cuda or torch.compiler.is_compiling():
        n_valid = (targets != ignore_index).sum().clamp(min=1)
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / n_valid
    return _CrossEntropy.apply(logits, targets, ignore_index)


def perplexity(mean_loss: float) -> float:
    """exp(mean loss in nats), capped for a diverged model where it would overflow a float."""
    return math.exp(min(mean_loss, MAX_LOG_PERPLEXITY))
