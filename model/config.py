"""GPTConfig: the shape of a GPT, with the GPT-2 sizes and small CPU presets.

The defaults are GPT-2's. The options position, norm, mlp, n_kv_head and qk_norm (each usable on its own)
turn the same model into the Llama / Qwen3 family: rotary positions, RMSNorm, a SwiGLU MLP, grouped-query
attention and, for Qwen3, RMSNorm on each head's queries and keys.
"""

import math
from dataclasses import asdict, dataclass, fields

from model.rope import scaling_parameters

GPT2_VOCAB_SIZE = 50257
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
SWIGLU_MULTIPLE = 64  # the SwiGLU hidden width is rounded up to a multiple of this (Llama rounds to 256)

# Llama: rotary positions, RMSNorm, SwiGLU, no biases, an untied head; Qwen3 adds qk_norm.
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, bias=False, tie_embeddings=False)
QWEN3 = dict(LLAMA, qk_norm=True)

PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, context_length=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, context_length=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, context_length=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, context_length=1024),
    "nano": dict(n_layer=2, n_head=4, n_embd=64, context_length=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, context_length=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, context_length=256),
}
# Llama and Qwen3 at the sizes of the small presets, with half as many key/value heads as query heads
PRESETS.update({f"{family}-{size}": {**PRESETS[size], **options, "n_kv_head": PRESETS[size]["n_head"] // 2}
                for family, options in (("llama", LLAMA), ("qwen3", QWEN3)) for size in ("nano", "mini", "small")})


class ConfigError(ValueError):
    """A GPTConfig whose sizes cannot build a model."""


def _is_positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = GPT2_VOCAB_SIZE
    context_length: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    qkv_bias: bool = True  # GPT-2 has biases on the QKV projection; the book's own model turns them off
    bias: bool = True  # biases of the other linear layers and the LayerNorms
    layer_norm_eps: float = 1e-5  # the eps of every norm, RMSNorm included
    # GPT-2 reads logits off the token embedding; the book's GPTModel has a separate output layer,
    # which trains differently from its N(0, 1) init (see bench/bench_verdict.py).
    tie_embeddings: bool = True
    position: str = "learned"  # "learned": a wpe table added to the tokens; "rope": q and k rotated, no table
    rope_theta: float = 10000.0  # the base of the rotary frequencies
    rope_scaling: dict | None = None  # a Hugging Face rope_parameters' scaling (model.rope): imported models'
    norm: str = "layernorm"  # or "rmsnorm" (a weight, no bias)
    mlp: str = "gelu"  # or "swiglu": silu(gate) * up, gate and up fused in c_fc
    mlp_hidden: int | None = None  # None: 4 * n_embd for gelu; for swiglu 8/3 * n_embd rounded up to 64
    n_kv_head: int | None = None  # key/value heads, shared by groups of query heads (GQA); None: n_head
    qk_norm: bool = False  # RMSNorm over head_dim on each head's queries and keys, before RoPE (Qwen3)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")
        self._check_family_options()

    def _check_family_options(self) -> None:
        _choice("position", self.position, POSITIONS)
        _choice("norm", self.norm, NORMS)
        _choice("mlp", self.mlp, MLPS)
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, int | float) or not theta > 0:
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta!r}")
        object.__setattr__(self, "rope_theta", float(theta))  # JSON may give an int
        if self.rope_scaling is not None:
            if self.position != "rope" or not isinstance(self.rope_scaling, dict):
                raise ConfigError("rope_scaling is a dict of rotary positions' scaling, with position 'rope'")
            try:
                object.__setattr__(self, "rope_scaling", scaling_parameters(self.rope_scaling))
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.position == "rope" and self.head_dim % 2:
            raise ConfigError(f"position 'rope' rotates pairs of dimensions: head_dim (n_embd / n_head = "
                              f"{self.head_dim}) must be even")
        if self.mlp_hidden is not None and not _is_positive_int(self.mlp_hidden):
            raise ConfigError(f"mlp_hidden must be a positive integer or None, got {self.mlp_hidden!r}")
        if self.n_kv_head is not None and not _is_positive_int(self.n_kv_head):
            raise ConfigError(f"n_kv_head must be a positive integer or None, got {self.n_kv_head!r}")
        if self.n_head % self.kv_heads:
            raise ConfigError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if not isinstance(self.qk_norm, bool):
            raise ConfigError(f"qk_norm must be true or false, got {self.qk_norm!r}")

    @property
    def family(self) -> str:
        """"gpt2", "llama" (rotary positions: the family's layout for export and import) or "qwen3" (QK-norm too)."""
        return "qwen3" if self.qk_norm else "llama" if self.position == "rope" else "gpt2"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """The key/value heads of each layer (the KV cache holds these)."""
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width. SwiGLU's default, 8/3 * n_embd, gives its three matrices about the
        parameters of GELU's two 4 * n_embd ones (Llama's rule, rounded to a multiple of 64, not 256)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return SWIGLU_MULTIPLE * math.ceil(8 * self.n_embd / 3 / SWIGLU_MULTIPLE)

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown GPTConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
