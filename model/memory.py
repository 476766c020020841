"""Memory a GPT needs, computed from its GPTConfig alone: nothing is built or allocated.

The services refuse what does not fit their budget before a model exists, so these are plain arithmetic.
Weights and the KV cache are exact; training activations are a documented rough estimate.
"""

from dataclasses import replace

from model.config import GPTConfig
from model.lora import LoRAConfig

FLOAT32_BYTES = 4
# The logits and their gradient (the cross-entropy's softmax), per token: 2 x vocab_size floats.
LOGIT_COPIES = 2


def linear_shapes(config: GPTConfig) -> dict[str, list[tuple[int, int]]]:
    """(inputs, outputs) of a block's linear layers under the names LoRA targets: c_proj is both the
    attention's and the MLP's; SwiGLU's c_fc holds the gate and up projections."""
    c, hidden = config.n_embd, config.mlp_width
    qkv = c + 2 * config.kv_heads * config.head_dim
    fc = 2 * hidden if config.mlp == "swiglu" else hidden
    return {"c_attn": [(c, qkv)], "c_proj": [(c, c), (hidden, c)], "c_fc": [(c, fc)]}


def norm_parameters(config: GPTConfig) -> int:
    """One norm over n_embd: a weight, and a LayerNorm's bias when config.bias."""
    return config.n_embd * (1 + int(config.bias and config.norm == "layernorm"))


def block_parameters(config: GPTConfig) -> int:
    """The parameters of one transformer block."""
    linears = sum(n_in * n_out + n_out * int(config.qkv_bias if name == "c_attn" else config.bias)
                  for name, layers in linear_shapes(config).items() for n_in, n_out in layers)
    qk_norm = 2 * config.head_dim if config.qk_norm else 0
    return 2 * norm_parameters(config) + linears + qk_norm


def num_parameters(config: GPTConfig) -> int:
    """GPT(config).num_parameters(), without building it."""
    c = config.n_embd
    positions = config.context_length * c if config.position == "learned" else 0  # rope has no table
    head = 0 if config.tie_embeddings else config.vocab_size * c
    embeddings = config.vocab_size * c + positions + head
    return embeddings + config.n_layer * block_parameters(config) + norm_parameters(config)


def lora_parameters(config: GPTConfig, lora: LoRAConfig) -> int:
    """The adapters apply_lora adds to a GPT: rank x (inputs + outputs) per adapted linear layer."""
    shapes = linear_shapes(config)
    per_block = sum(lora.rank * (n_in + n_out) for target in lora.targets for n_in, n_out in shapes[target])
    return config.n_layer * per_block


def activation_floats_per_layer(config: GPTConfig) -> int:
    """The activations one layer keeps per token for the backward pass, in floats: the two norm inputs (2C),
    q, k, v (C + 2 x the key/value width), the attention output (C), the MLP's hidden layers (GELU: before and
    after it, 2 x hidden; SwiGLU: gate, up, silu(gate) and the product, 4 x hidden) and the two residual sums
    (2C); 16C for GPT-2. Fused attention (scaled_dot_product_attention) keeps no T x T scores."""
    c = config.n_embd
    qkv = c + 2 * config.kv_heads * config.head_dim
    mlp = (4 if config.mlp == "swiglu" else 2) * config.mlp_width
    return 2 * c + qkv + c + mlp + 2 * c


def weight_bytes(config: GPTConfig, dtype_bytes: int = FLOAT32_BYTES) -> int:
    return num_parameters(config) * dtype_bytes


def activation_bytes(config: GPTConfig, batch_size: int, context: int, dtype_bytes: int = FLOAT32_BYTES,
                     logits_per_token: int | None = None) -> int:
    """A rough estimate of the activations one training step keeps for the backward pass; logits_per_token
    defaults to the LM head's vocab_size (a classifier's head reads one position: 0)."""
    logits = config.vocab_size if logits_per_token is None else logits_per_token
    per_token = config.n_layer * activation_floats_per_layer(config) + LOGIT_COPIES * logits
    return batch_size * context * per_token * dtype_bytes


def _step_bytes(weights: int, trainable: int, activations: int, dtype_bytes: int) -> int:
    """All weights, the gradients and AdamW's two moments of the trainable ones, one step's activations."""
    return (weights + 3 * trainable) * dtype_bytes + activations


def training_bytes(config: GPTConfig, batch_size: int, context: int, dtype_bytes: int = FLOAT32_BYTES) -> int:
    """Pretraining: every weight trained."""
    n = num_parameters(config)
    return _step_bytes(n, n, activation_bytes(config, batch_size, context, dtype_bytes), dtype_bytes)


def finetune_bytes(config: GPTConfig, batch_size: int, context: int, n_classes: int | None = None,
                   trainable_blocks: int = 1, lora: LoRAConfig | None = None,
                   dtype_bytes: int = FLOAT32_BYTES) -> int:
    """Finetuning a GPT of config: an instruction finetune (n_classes None) trains every weight, or with
    lora its adapters; a classifier (the LM head replaced by an n_classes head) trains its last
    trainable_blocks blocks, the final norm and the head, or with lora its adapters and the head."""
    adapters = lora_parameters(config, lora) if lora is not None else 0
    if n_classes is None:
        weights = num_parameters(config)
        trainable = adapters if lora is not None else weights
        activations = activation_bytes(config, batch_size, context, dtype_bytes)
        return _step_bytes(weights + adapters, trainable, activations, dtype_bytes)
    body = replace(config, tie_embeddings=True)
    head = (config.n_embd + 1) * n_classes
    top = trainable_blocks * block_parameters(config) + norm_parameters(config)
    trainable = head + (adapters if lora is not None else top)
    activations = activation_bytes(body, batch_size, context, dtype_bytes, logits_per_token=0)
    return _step_bytes(num_parameters(body) + head + adapters, trainable, activations, dtype_bytes)


def kv_cache_bytes(config: GPTConfig, n_slots: int, context: int | None = None,
                   dtype_bytes: int = FLOAT32_BYTES) -> int:
    """Keys and values of a KVCache with n_slots slots of `context` positions (default: the context length);
    with grouped-query attention it holds the n_kv_head heads alone."""
    positions = config.context_length if context is None else context
    return 2 * config.n_layer * n_slots * config.kv_heads * positions * config.head_dim * dtype_bytes


def serving_bytes(config: GPTConfig, n_slots: int, dtype_bytes: int = FLOAT32_BYTES, packed: bool = True) -> int:
    """A language model served to n_slots sequences at once: its weights, the oneDNN copy of them the engine
    keeps for batches of more than one where it can (`GPT.pack_for_batches`; packed: the weights are on a
    device and in a dtype `model.linear.packable` allows) and the KV cache for its whole context."""
    copies = 2 if packed and n_slots > 1 else 1
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
