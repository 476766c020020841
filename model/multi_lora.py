"""Many LoRA adapters served at once over one base model: each batch row goes through its own adapter, or none.

The base weights stay unmerged and shared. Each adapted layer stacks its adapters' A and B (zero-padded to the
largest rank; slot 0 all zeros, for rows of the base alone); a forward gathers each row's pair and adds its two
thin products x A^T B^T with two batched matmuls: Punica's BGMV (vLLM's multi-LoRA decode kernel) in plain torch
ops, whatever the number of adapters in the batch. A batch whose rows use no adapter runs the base layers alone.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from model.gpt import GPT
from model.linear import Linear
from model.lora import LORA_TARGETS, Adapter, has_lora


class MultiLoRALinear(Linear):
    """A base Linear plus, per batch row, one of several adapters; its weight and bias are the base's (packing
    it packs them)."""

    def __init__(self, base: nn.Linear):
        # on the meta device: the weight is the base's, so none is allocated for nothing
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias
        self.packed = getattr(base, "packed", None)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        # slot i > 0: adapter i - 1's A^T [in, R] and scale * B^T [R, out], zero-padded to the largest rank R
        self.register_buffer("a_stack", torch.zeros(1, base.in_features, 0, **like), persistent=False)
        self.register_buffer("b_stack", torch.zeros(1, 0, base.out_features, **like), persistent=False)
        self.rows: Tensor | None = None  # [B] the slot of each batch row (0: none); None: no row has an adapter

    @property
    def n_adapters(self) -> int:
        return len(self.a_stack) - 1

    def append(self, pair: tuple[Tensor, Tensor] | None) -> None:
        """Stack the next adapter's (A [r, in], scale * B [out, r]); None for one that leaves this layer be."""
        slots, rank = len(self.a_stack), self.a_stack.shape[2]
        widest = max(rank, 0 if pair is None else len(pair[0]))
        a = self.a_stack.new_zeros(slots + 1, self.in_features, widest)
        b = self.b_stack.new_zeros(slots + 1, widest, self.out_features)
        a[:slots, :, :rank], b[:slots, :rank] = self.a_stack, self.b_stack
        if pair is not None:
            a[slots, :, : len(pair[0])], b[slots, : len(pair[0])] = pair[0].t(), pair[1].t()
        self.a_stack, self.b_stack = a, b

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)  # [B, T, out]
        if self.rows is None:
            return y
        if len(self.rows) != len(x):
            raise ValueError(f"adapters were chosen for {len(self.rows)} rows, the batch has {len(x)}")
        a = self.a_stack.index_select(0, self.rows)  # [B, in, R]: each row's own A^T
        b = self.b_stack.index_select(0, self.rows)  # [B, R, out]
        return y.baddbmm_(torch.bmm(x, a), b)  # + (x A^T) B^T


class AdapterSet:
    """The adapters served over one GPT, by name. `AdapterSet(model)` puts a MultiLoRALinear in place of each
    of the model's LoRA target layers; build it over the model on its serving device and dtype (adapters are
    converted to them as they are added)."""

    def __init__(self, model: GPT):
        if has_lora(model) or any(isinstance(m, MultiLoRALinear) for m in model.modules()):
            raise ValueError("the model has adapters already: merge its LoRA layers (merge_lora) or reuse its "
                             "AdapterSet")
        self.layers: dict[str, MultiLoRALinear] = {}
        for name, module in list(model.named_modules()):
            parent, _, child = name.rpartition(".")
            if child in LORA_TARGETS and isinstance(module, nn.Linear):
                self.layers[name] = MultiLoRALinear(module)
                setattr(model.get_submodule(parent), child, self.layers[name])
        self.device = model.wte.weight.device
        self._indices: dict[str, int] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters' names, in the order they were added."""
        return tuple(self._indices)

    def __contains__(self, name: str) -> bool:
        return name in self._indices

    def add(self, name: str, adapter: Adapter) -> None:
        """Serve adapter under name; ValueError, and the set unchanged, if it does not fit the model."""
        if name in self:
            raise ValueError(f"an adapter named {name!r} is served already")
        pairs = self._pairs(adapter)
        for layer_name, layer in self.layers.items():
            layer.append(pairs.get(layer_name))
        self._indices[name] = len(self._indices)

    def _pairs(self, adapter: Adapter) -> dict[str, tuple[Tensor, Tensor]]:
        """(A, scale * B) of each layer the adapter adapts, in the layer's device and dtype."""
        by_layer: dict[str, dict[str, Tensor]] = {}
        for key, tensor in adapter.tensors.items():
            layer_name, _, kind = key.rpartition(".")
            if layer_name not in self.layers or kind not in ("lora_a", "lora_b"):
                raise ValueError(f"adapter tensor {key} adapts no layer of the model")
            by_layer.setdefault(layer_name, {})[kind] = tensor
        rank, pairs = adapter.config.rank, {}
        for layer_name, tensors in by_layer.items():
            layer = self.layers[layer_name]
            a, b = tensors.get("lora_a"), tensors.get("lora_b")
            if a is None or b is None or a.shape != (rank, layer.in_features) or b.shape != (layer.out_features,
                                                                                                rank):
                raise ValueError(f"the adapter's tensors for {layer_name} do not fit it: want lora_a "
                                 f"{(rank, layer.in_features)} and lora_b {(layer.out_features, rank)}")
            pairs[layer_name] = (a.to(layer.weight), (b * adapter.config.scale).to(layer.weight))
        return pairs

    @contextmanager
    def rows(self, names: list[str | None]) -> Iterator[None]:
        """For the forwards inside, batch row i goes through the adapter names[i] (None: the base alone)."""
        unknown = [name for name in names if name is not None and name not in self]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r}")
        slots = [0 if name is None else self._indices[name] + 1 for name in names]
        rows = torch.tensor(slots, device=self.device) if any(slots) else None
        for layer in self.layers.values():
            layer.rows = rows
        try:
            yield
        finally:
            for layer in self.layers.values():
                layer.rows = None


def adapter_bytes(adapter: Adapter, dtype: torch.dtype | None = None) -> int:
    """The memory serving adapter adds to its base's: its tensors, in dtype (their own when None)."""
    return sum(t.numel() * (t.element_size() if dtype is None else dtype.itemsize) for t in adapter.tensors.values())
