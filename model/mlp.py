"""The feed-forward layers of a block: GPT-2's GELU MLP or Llama's SwiGLU, chosen by GPTConfig.mlp.

Both name their input projection c_fc and their output projection c_proj, so LoRA's targets and the
multi-LoRA AdapterSet adapt either.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from model.config import GPTConfig
from model.linear import Linear


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.mlp_width, bias=config.bias)
        self.c_proj = Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class SwiGLU(nn.Module):
    """c_proj(silu(gate) * up); the gate and up projections are one Linear c_fc, gate's rows first."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 2 * config.mlp_width, bias=config.bias)
        self.c_proj = Linear(config.mlp_width, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.c_fc(x).chunk(2, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


def mlp_layer(config: GPTConfig) -> nn.Module:
    return SwiGLU(config) if config.mlp == "swiglu" else MLP(config)
