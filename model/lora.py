"""LoRA: low-rank adapters on linear layers, trained while the base weights stay frozen.

y = x W^T + b + (alpha / rank) * x A^T B^T, with A [rank, in] random and B [out, rank] zero, so a fresh
adapter changes nothing. The adapter merges into W for serving, or is served apart from W, many adapters over
one base (model.multi_lora).
"""

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from model.linear import Linear

LORA_TARGETS = ("c_attn", "c_proj", "c_fc")  # the linear layers of a GPT block, all adapted by default


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS  # names of the linear layers that get an adapter
    dropout: float = 0.0

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not self.targets:
            raise ValueError("LoRA needs at least one target module name")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


@dataclass(frozen=True, eq=False)
class Adapter:
    """A LoRA adapter apart from its base model (an adapter-only checkpoint, `load_adapter`)."""

    config: LoRAConfig
    tensors: dict[str, Tensor]  # lora_a [rank, in] and lora_b [out, rank] of each adapted layer, state-dict keys
    meta: dict  # its checkpoint's metadata


class LoRALinear(Linear):
    """A Linear with an adapter; its weight and bias keep their names, so base weights load as usual."""

    def __init__(self, base: nn.Linear, config: LoRAConfig):
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None,
                         device=base.weight.device, dtype=base.weight.dtype)
        self.weight, self.bias = base.weight, base.bias
        self.scale = config.scale
        self.lora_a = nn.Parameter(torch.empty(config.rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, config.rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) + (self.lora_dropout(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged(self) -> Linear:
        linear = Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + (self.lora_b @ self.lora_a) * self.scale)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


def _children(model: nn.Module, kind: type, names: tuple[str, ...] | None = None):
    """(parent, name, child) for every child of the given type (and name); a list, safe to replace in."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, kind) and (names is None or name in names)]


def apply_lora(model: nn.Module, config: LoRAConfig, trainable: tuple[nn.Module, ...] = ()) -> int:
    """Freeze model, add adapters to its target linear layers; the modules in trainable stay trainable.

    Returns the number of trainable parameters.
    """
    model.requires_grad_(False)
    wrapped = 0
    for parent, name, linear in _children(model, nn.Linear, config.targets):
        if isinstance(linear, LoRALinear):
            continue
        setattr(parent, name, LoRALinear(linear, config))
        wrapped += 1
    if not wrapped:
        raise ValueError(f"no linear layer named {', '.join(config.targets)} to adapt")
    for module in trainable:
        module.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put back plain Linear layers (for serving)."""
    for parent, name, adapter in _children(model, LoRALinear):
        setattr(parent, name, adapter.merged())
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors alone (lora_a and lora_b of every LoRALinear), keyed as in model.state_dict()."""
    return {f"{name}.{kind}": getattr(module, kind).detach() for name, module in model.named_modules()
            if isinstance(module, LoRALinear) for kind in ("lora_a", "lora_b")}
