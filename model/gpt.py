"""The GPT: token + learned position embeddings, pre-LayerNorm blocks, a final LayerNorm and an LM head
tied to the token embedding (or, with tie_embeddings=False, a separate output layer).

The same model is a Llama or Qwen3 with rotary positions (no position table), RMSNorm, SwiGLU,
grouped-query attention and qk_norm (see GPTConfig); the norms keep GPT-2's names ln_1, ln_2 and ln_f.
"""

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import CausalSelfAttention
from model.config import GPTConfig
from model.kv_cache import CacheWrite, KVCache
from model.linear import Linear, PackedWeight, pack, pack_linears
from model.loss import cross_entropy
from model.mlp import mlp_layer
from model.norm import norm_layer
from model.rope import rotation


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = norm_layer(config)
        self.mlp = mlp_layer(config)

    def forward(self, x: Tensor, cache: KVCache | None = None, layer: int = 0, write: CacheWrite | None = None,
                rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, write, rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = norm_layer(config)
        self.lm_head = None if config.tie_embeddings else Linear(config.n_embd, config.vocab_size,
                                                                 bias=False)
        self.packed_output: PackedWeight | None = None  # see pack_for_batches
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_projection", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def pack_for_batches(self) -> None:
        """Keep a oneDNN copy of every weight matrix for CPU products of several rows (`model.linear`).

        For a model kept to decode batches (the serving engine): about 2x faster matmuls at 8 sequences, for
        a second copy of the weights in memory. A copy is used only while its weight is unchanged.
        """
        pack_linears(self)  # an untied head is one of them
        self.packed_output = pack(self.wte.weight) if self.lm_head is None else self.lm_head.packed

    def shorten_context(self, context_length: int) -> None:
        """Work at a shorter context than the model was built for (an imported model's may be 128k tokens, whose
        KV cache would not fit): the same weights, the position table's first rows (rotary positions have none)."""
        if not isinstance(context_length, int) or not 2 <= context_length <= self.config.context_length:
            raise ValueError(f"context_length must be an integer from 2 to the model's {self.config.context_length}, "
                             f"got {context_length!r}")
        self.config = replace(self.config, context_length=context_length)
        if self.wpe is not None:
            self.wpe.weight = nn.Parameter(self.wpe.weight.detach()[:context_length].clone())
            self.wpe.num_embeddings = context_length

    @property
    def output_weight(self) -> Tensor:
        """The LM head's weight [vocab_size, C]: the token embedding when tied."""
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: Tensor, cache: KVCache | None = None,
                      slots: Tensor | None = None) -> Tensor:
        """Final-norm hidden states [B, T, C] of token ids idx [B, T].

        With a cache, idx continues each row's cached sequence (rows are slots 0..B-1, or `slots`).
        """
        B, T = idx.shape
        write = None if cache is None else cache.plan(B, T, slots)
        length = T if write is None else write.key_length
        if length > self.config.context_length:
            raise ValueError(f"sequence of {length} tokens exceeds the context length "
                             f"{self.config.context_length}")
        x, rope = self._embed(idx, write)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer, write, rope)
        if cache is not None:
            cache.commit(write, T)
        return self.ln_f(x)

    def _embed(self, idx: Tensor, write: CacheWrite | None) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The embeddings [B, T, C] of the new tokens idx [B, T]: with learned positions, tokens + positions;
        with rope, the tokens alone and the cos and sin that rotate the queries and keys at their positions."""
        T = idx.shape[1]
        x = self.wte(idx)
        if self.wpe is None:
            positions = torch.arange(T, device=idx.device) if write is None else write.positions[:, None]
            return x, rotation(positions, self.config.head_dim, self.config.rope_theta, x.dtype,
                               self.config.rope_scaling)
        start = 0 if write is None else write.start
        if start is not None:  # every row at the same positions: a slice, not a gather
            return x + self.wpe.weight[start: start + T], None
        return x + self.wpe(write.positions), None

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits [B, T, vocab_size] and, with targets [B, T] (-100 = ignored), the mean loss."""
        hidden = self.hidden_states(idx)
        logits = F.linear(hidden, self.wte.weight) if self.lm_head is None else self.lm_head(hidden)
        if targets is None:
            return logits, None
        return logits, cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def new_cache(self, n_slots: int, max_length: int | None = None) -> KVCache:
        c = self.config
        weight = self.wte.weight
        return KVCache(c.n_layer, n_slots, c.kv_heads, max_length or c.context_length, c.head_dim,
                       device=weight.device, dtype=weight.dtype)
