"""Memory a GPT needs, computed from its GPTConfig alone: nothing is built or allocated.

The services refuse what does not fit their budget before a model exists, so these are plain arithmetic.
Weights and the KV cache are exact; training activations are a documented rough estimate.
"""

from model.config import GPTConfig

FLOAT32_BYTES = 4
# Activations kept per layer and token for the backward pass, in floats: the two LayerNorm inputs (2C),
# q, k, v (3C), the attention output (C), the MLP's hidden layer before and after the GELU (8C) and the
# two residual sums (2C). Fused attention (scaled_dot_product_attention) keeps no T x T scores.
ACTIVATION_FLOATS_PER_LAYER = 16
# The logits and their gradient (the cross-entropy's softmax), per token: 2 x vocab_size floats.
LOGIT_COPIES = 2


def num_parameters(config: GPTConfig) -> int:
    """GPT(config).num_parameters(), without building it."""
    c, bias = config.n_embd, int(config.bias)
    layer_norm = c * (1 + bias)
    attention = c * 3 * c + 3 * c * int(config.qkv_bias) + c * c + c * bias
    mlp = c * 4 * c + 4 * c * bias + 4 * c * c + c * bias
    block = 2 * layer_norm + attention + mlp
    embeddings = (config.vocab_size + config.context_length) * c
    head = 0 if config.tie_embeddings else config.vocab_size * c
    return embeddings + config.n_layer * block + layer_norm + head


def weight_bytes(config: GPTConfig, dtype_bytes: int = FLOAT32_BYTES) -> int:
    return num_parameters(config) * dtype_bytes


def optimizer_bytes(config: GPTConfig, dtype_bytes: int = FLOAT32_BYTES) -> int:
    """AdamW's state: two moments per parameter."""
    return 2 * weight_bytes(config, dtype_bytes)


def activation_bytes(config: GPTConfig, batch_size: int, context: int, dtype_bytes: int = FLOAT32_BYTES) -> int:
    """A rough estimate of the activations one training step keeps for the backward pass."""
    per_token = config.n_layer * ACTIVATION_FLOATS_PER_LAYER * config.n_embd + LOGIT_COPIES * config.vocab_size
    return batch_size * context * per_token * dtype_bytes


def training_bytes(config: GPTConfig, batch_size: int, context: int, dtype_bytes: int = FLOAT32_BYTES) -> int:
    """Weights, their gradients, AdamW's state and one step's activations."""
    weights = weight_bytes(config, dtype_bytes)
    return 2 * weights + optimizer_bytes(config, dtype_bytes) + activation_bytes(config, batch_size, context,
                                                                                 dtype_bytes)


def kv_cache_bytes(config: GPTConfig, n_slots: int, context: int | None = None,
                   dtype_bytes: int = FLOAT32_BYTES) -> int:
    """Keys and values of a KVCache with n_slots slots of `context` positions (default: the context length)."""
    positions = config.context_length if context is None else context
    return 2 * config.n_layer * n_slots * config.n_head * positions * config.head_dim * dtype_bytes


def serving_bytes(config: GPTConfig, n_slots: int, dtype_bytes: int = FLOAT32_BYTES) -> int:
    """A language model served to n_slots sequences at once: its weights, the oneDNN copy of them the engine
    keeps for batches of more than one (`GPT.pack_for_batches`) and the KV cache for its whole context."""
    copies = 2 if n_slots > 1 else 1
    return copies * weight_bytes(config, dtype_bytes) + kv_cache_bytes(config, n_slots, dtype_bytes=dtype_bytes)


def human_bytes(n: int) -> str:
    """n bytes in binary units, e.g. 1.5 GiB."""
    if n < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"
