"""GPTConfig: the shape of a GPT, with the GPT-2 sizes and small CPU presets."""

from dataclasses import asdict, dataclass, fields

GPT2_VOCAB_SIZE = 50257

PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, context_length=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, context_length=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, context_length=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, context_length=1024),
    "nano": dict(n_layer=2, n_head=4, n_embd=64, context_length=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, context_length=256),
    "small": dict(n_layer=6, n_head=6, n_embd=384, context_length=256),
}


class ConfigError(ValueError):
    """A GPTConfig whose sizes cannot build a model."""


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
    layer_norm_eps: float = 1e-5
    # GPT-2 reads logits off the token embedding; the book's GPTModel has a separate output layer,
    # which trains differently from its N(0, 1) init (see bench/bench_verdict.py).
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be positive, got {self.layer_norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

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
