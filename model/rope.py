"""Rotary position embeddings (RoPE): each head's queries and keys rotated by angles proportional to their
position, so that their dot product depends on the distance between positions alone.

transformers' Llama convention: dimension i is paired with i + head_dim / 2 (`rotate_half`), not with its
neighbour, and the frequencies are theta^(-2i / head_dim); a Hugging Face checkpoint's q and k weights then
load as they are.

Scaled variants stretch a model's context past the length it was trained at by slowing the rotations, with the
parameters of a Hugging Face config's rope_parameters (`rope_scaling`: a dict with `rope_type`):
- "linear": every frequency divided by `factor` (positions interpolated);
- "llama3" (Llama 3.1 and later): the low frequencies divided by `factor`, the high ones kept, and a smooth blend
  between `low_freq_factor` and `high_freq_factor` wavelengths of `original_max_position_embeddings`;
- "yarn" (Qwen's long context): the same kind of blend by the number of rotations over the original context
  (`beta_fast`, `beta_slow`), and cos and sin scaled by an attention factor (0.1 ln(factor) + 1 by default).
"""

import math

import torch
from torch import Tensor

ROPE_SCALINGS = {  # rope_type: its parameters, None where required
    "linear": {"factor": None},
    "llama3": {"factor": None, "low_freq_factor": None, "high_freq_factor": None,
               "original_max_position_embeddings": None},
    "yarn": {"factor": None, "original_max_position_embeddings": None, "beta_fast": 32.0, "beta_slow": 1.0,
             "attention_factor": None, "truncate": True},
}


def _llama3(inverse: Tensor, s: dict) -> Tensor:
    wavelengths = 2 * math.pi / inverse
    original = s["original_max_position_embeddings"]
    smooth = (original / wavelengths - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * inverse / s["factor"] + smooth * inverse
    slowed = torch.where(wavelengths > original / s["low_freq_factor"], inverse / s["factor"], inverse)
    medium = (wavelengths >= original / s["high_freq_factor"]) & (wavelengths <= original / s["low_freq_factor"])
    return torch.where(medium, blended, slowed)


def _yarn(inverse: Tensor, s: dict, head_dim: int, theta: float) -> Tensor:
    def dimension_of(rotations: float) -> float:  # the dimension that turns `rotations` times over the context
        return head_dim * math.log(s["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = dimension_of(s["beta_fast"]), dimension_of(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32, device=inverse.device) - low)
            / (high - low if high != low else 0.001)).clamp(0, 1)  # 0: kept, 1: interpolated
    return inverse / s["factor"] * ramp + inverse * (1 - ramp)


def scaling_parameters(scaling: dict) -> dict:
    """A rope_scaling dict with its defaults filled in; ValueError naming what is missing or unknown."""
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_type must be one of {', '.join(map(repr, ROPE_SCALINGS))}, got {kind!r}")
    known = ROPE_SCALINGS[kind]
    unknown = sorted(k for k, v in scaling.items() if k not in known and k != "rope_type" and v is not None)
    if unknown:
        raise ValueError(f"rope_type {kind!r} takes {', '.join(known)}, not {', '.join(unknown)}")
    filled = {**known, **{k: v for k, v in scaling.items() if v is not None and k != "rope_type"}}
    for name, value in filled.items():
        if name == "truncate":
            if not isinstance(value, bool):
                raise ValueError(f"rope scaling's truncate must be true or false, got {value!r}")
        elif value is None and name != "attention_factor":
            raise ValueError(f"rope_type {kind!r} needs {name}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0):
            raise ValueError(f"rope scaling's {name} must be a positive number, got {value!r}")
    if kind == "llama3" and not filled["high_freq_factor"] > filled["low_freq_factor"]:
        raise ValueError("rope scaling's high_freq_factor must be larger than its low_freq_factor")
    return {"rope_type": kind, **filled}


def inverse_frequencies(head_dim: int, theta: float, scaling: dict | None, device=None) -> tuple[Tensor, float]:
    """The rotation speed of each pair of dimensions [head_dim / 2], and the factor cos and sin are scaled by."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inverse = 1.0 / (theta ** exponents)
    if scaling is None:
        return inverse, 1.0
    s = scaling  # as GPTConfig holds it: checked, its defaults filled in (scaling_parameters)
    if s["rope_type"] == "linear":
        return inverse / s["factor"], 1.0
    if s["rope_type"] == "llama3":
        return _llama3(inverse, s), 1.0
    attention_factor = s["attention_factor"] or (0.1 * math.log(s["factor"]) + 1.0 if s["factor"] > 1 else 1.0)
    return _yarn(inverse, s, head_dim, theta), attention_factor


def rotation(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype,
             scaling: dict | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin [..., T, head_dim] of the angles at positions [..., T] (computed in float32, as transformers
    does: bfloat16 angles would be wrong by whole radians at long positions)."""
    inverse, attention_factor = inverse_frequencies(head_dim, theta, scaling, positions.device)  # [head_dim / 2]
    angles = positions.float()[..., None] * inverse  # [..., T, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotation(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, D] rotated by cos, sin [T, D] or [B, 1, T, D] (from `rotation`)."""
    return x * cos + rotate_half(x) * sin
