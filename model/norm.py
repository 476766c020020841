"""The normalization layers: GPT-2's LayerNorm or Llama's RMSNorm, chosen by GPTConfig.norm."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import GPTConfig


class RMSNorm(nn.Module):
    """x / rms(x) * weight: no mean subtracted, no bias.

    Normalized in float32 and cast back before the weight, as transformers' LlamaRMSNorm does, so that
    bfloat16 models match theirs.
    """

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def norm_layer(config: GPTConfig) -> nn.Module:
    """A norm over n_embd of the kind config.norm names."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.layer_norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
