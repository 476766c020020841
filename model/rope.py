"""Rotary position embeddings (RoPE): each head's queries and keys rotated by angles proportional to their
position, so that their dot product depends on the distance between positions alone.

transformers' Llama convention: dimension i is paired with i + head_dim / 2 (`rotate_half`), not with its
neighbour, and the frequencies are theta^(-2i / head_dim); a Hugging Face checkpoint's q and k weights then
load as they are.
"""

import torch
from torch import Tensor


def rotation(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sin [..., T, head_dim] of the angles at positions [..., T] (computed in float32, as transformers
    does: bfloat16 angles would be wrong by whole radians at long positions)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inverse_frequencies = 1.0 / (theta ** exponents)  # [head_dim / 2]
    angles = positions.float()[..., None] * inverse_frequencies  # [..., T, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotation(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D] rotated by cos, sin [T, D] or [B, 1, T, D] (from `rotation`)."""
    return x * cos + rotate_half(x) * sin
