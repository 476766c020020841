"""Causal multi-head self-attention with one fused QKV projection.

With n_kv_head < n_head (grouped-query attention) each key/value head serves n_head / n_kv_head query heads:
the projection and the KV cache hold n_kv_head heads, and scaled_dot_product_attention shares them
(enable_gqa) without copying them per query head. On CPU this beats expanding the heads, masked or not; on CUDA
(torch 2.13) a masked call with enable_gqa runs the math kernel, as the fused kernels take no mask with it.
"""

import torch.nn.functional as F
from torch import Tensor, nn

from model.config import GPTConfig
from model.kv_cache import CacheWrite, KVCache
from model.linear import Linear
from model.norm import RMSNorm
from model.rope import apply_rotation


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads
        self.head_dim = config.head_dim
        kv_width = self.n_kv_head * self.head_dim
        self.split = (config.n_embd, kv_width, kv_width)  # q, k, v
        self.c_attn = Linear(config.n_embd, sum(self.split), bias=config.qkv_bias)
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual_projection = True  # scaled at init
        # Qwen3 normalizes each head's queries and keys, which keeps their dot products from growing
        self.q_norm = RMSNorm(self.head_dim, config.layer_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.layer_norm_eps) if config.qk_norm else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0,
                write: CacheWrite | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """rope: the cos and sin of the new tokens' positions (`model.rope.rotation`), None for learned ones."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # [B, H_kv, T, D]
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotation(q, *rope), apply_rotation(k, *rope)
        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa)
        else:
            k, v = cache.store(layer, write, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=write.mask, dropout_p=dropout,
                                               is_causal=write.causal, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))
