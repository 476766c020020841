"""Hugging Face Llama and Qwen3 checkpoints in and out: safetensors + config.json, as LlamaForCausalLM and
Qwen3ForCausalLM save them.

Both are our GPT with rotary positions, RMSNorm, SwiGLU, grouped-query attention and no biases; Qwen3 adds
qk_norm. Their q_proj, k_proj and v_proj are the rows of our fused c_attn, in that order, and their gate_proj
and up_proj those of our c_fc; every other tensor maps to one of ours. Both sides store nn.Linear weights
[out, in]: nothing is transposed. Pickled checkpoints are refused (see model.hf_gpt2).
"""

import os
from pathlib import Path

import torch
from torch import Tensor

from model.config import GPTConfig
from model.gpt import GPT
from model.hf_gpt2 import CONFIG, check_keys, read_tensors, safetensors_files, write_hf_checkpoint
from model.json_text import parse_json
from model.lora import has_lora
from model.rope import scaling_parameters
from model.tokenizer import Tokenizer

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# buffers older transformers versions saved with the weights; they are recomputed from the config
ROTARY_BUFFER = "rotary_emb.inv_freq"


def tensor_map(config: GPTConfig) -> dict[str, list[tuple[str, int]]]:
    """Each of our tensors and the Hugging Face tensors it stacks along dim 0, in order, with their rows."""
    c, kv, hidden = config.n_embd, config.kv_heads * config.head_dim, config.mlp_width
    names = {"wte.weight": [("model.embed_tokens.weight", config.vocab_size)],
             "ln_f.weight": [("model.norm.weight", c)]}
    if not config.tie_embeddings:
        names["lm_head.weight"] = [("lm_head.weight", config.vocab_size)]
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        attn, mlp = f"{theirs}self_attn.", f"{theirs}mlp."
        names.update({
            ours + "ln_1.weight": [(theirs + "input_layernorm.weight", c)],
            ours + "attn.c_attn.weight": [(attn + "q_proj.weight", c), (attn + "k_proj.weight", kv),
                                          (attn + "v_proj.weight", kv)],
            ours + "attn.c_proj.weight": [(attn + "o_proj.weight", c)],
            ours + "ln_2.weight": [(theirs + "post_attention_layernorm.weight", c)],
            ours + "mlp.c_fc.weight": [(mlp + "gate_proj.weight", hidden), (mlp + "up_proj.weight", hidden)],
            ours + "mlp.c_proj.weight": [(mlp + "down_proj.weight", c)],
        })
        if config.qk_norm:
            names[ours + "attn.q_norm.weight"] = [(attn + "q_norm.weight", config.head_dim)]
            names[ours + "attn.k_norm.weight"] = [(attn + "k_norm.weight", config.head_dim)]
    return names


def _rope(hf: dict) -> tuple[float, dict | None]:
    """The rotary base and scaling (model.rope); ValueError for a scaling our rotation does not do."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4 spellings
    if not isinstance(rope, dict):
        raise ValueError(f"rope_parameters must be an object, got {type(rope).__name__}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return theta, None
    # scaling_parameters refuses what our rotation does not compute (a partial rotation, DeepSeek's mscale...)
    return theta, scaling_parameters({"rope_type": kind, **{k: v for k, v in rope.items()
                                                            if k not in ("rope_theta", "rope_type", "type")}})


def _gpt_config(hf: dict) -> GPTConfig:
    """GPTConfig from a LlamaConfig / Qwen3Config's fields; ValueError for what our GPT does not compute."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type is {model_type!r}: only {' and '.join(ARCHITECTURES)} checkpoints can be "
                         f"imported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act is {hf['hidden_act']!r}; our SwiGLU computes silu")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(flag):
            raise ValueError(f"{flag} is set, which our GPT does not compute")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise ValueError(f"{CONFIG} lacks {', '.join(missing)}")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, n_embd // n_head):
        raise ValueError(f"head_dim is {hf['head_dim']}; ours is hidden_size / num_attention_heads = "
                         f"{n_embd // n_head}")
    theta, scaling = _rope(hf)
    return GPTConfig(
        vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
        n_layer=hf["num_hidden_layers"], n_head=n_head, n_embd=n_embd, qkv_bias=False, bias=False,
        layer_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        position="rope", rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", mlp="swiglu",
        mlp_hidden=hf["intermediate_size"], n_kv_head=hf.get("num_key_value_heads"), qk_norm=model_type == "qwen3",
    )


def _stacked(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    """Our tensors (float32 copies) made of a Hugging Face state dict; ValueError naming a missing, unexpected or
    misshapen tensor."""
    mapping = tensor_map(config)
    wanted = {name for parts in mapping.values() for name, _ in parts}
    # a tied head may be stored as a copy of the embedding; rotary buffers hold no weights
    ignored = {"lm_head.weight"} if config.tie_embeddings else set()
    check_keys(wanted, {k for k in state.keys() - ignored if not k.endswith(ROTARY_BUFFER)})
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in GPT(config).state_dict().items()}
    ours = {}
    for name, parts in mapping.items():
        for part, rows in parts:
            if state[part].shape != (rows, *shapes[name][1:]):
                raise ValueError(f"{part}: checkpoint shape {list(state[part].shape)}, the config needs "
                                 f"{[rows, *shapes[name][1:]]}")
        ours[name] = torch.cat([state[part] for part, _ in parts]).to(torch.float32)
    return ours


def import_hf_llama(directory: str | os.PathLike) -> GPT:
    """A GPT (float32, eval mode) holding a Hugging Face Llama or Qwen3 checkpoint's weights: a directory with
    config.json and model.safetensors (or its shards). ValueError for anything our GPT does not compute."""
    path = Path(directory)
    if not (path / CONFIG).is_file():
        raise ValueError(f"{path} is not a checkpoint directory with a {CONFIG}")
    config = _gpt_config(parse_json((path / CONFIG).read_text()))
    state = read_tensors(safetensors_files(path))
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(_stacked(state, config), assign=True)
    return model.eval()


def export_hf_llama(model: GPT, directory: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write model as a Hugging Face checkpoint directory that LlamaForCausalLM (or, with qk_norm,
    Qwen3ForCausalLM).from_pretrained loads, with the tokenizer's files as model.hf_gpt2's export writes them.
    ValueError, before anything is written, for a model that is not of the Llama family."""
    if not isinstance(model, GPT):
        raise ValueError(f"only a GPT language model can be exported, got {type(model).__name__}")
    if has_lora(model):
        raise ValueError("the model has LoRA adapters: merge them first with model.lora.merge_lora")
    c = model.config
    llama = {"position": (c.position, "rope"), "norm": (c.norm, "rmsnorm"), "mlp": (c.mlp, "swiglu"),
             "qkv_bias": (c.qkv_bias, False), "bias": (c.bias, False)}
    unlike = [f"{name}={ours!r}" for name, (ours, theirs) in llama.items() if ours != theirs]
    if unlike:
        raise ValueError(f"this model has {', '.join(unlike)}, which Hugging Face Llama and Qwen3 cannot express: "
                         f"they have rotary positions, RMSNorm, a SwiGLU MLP and no biases")
    state = model.state_dict()
    tensors = {}
    for name, parts in tensor_map(c).items():
        pieces = state[name].split([rows for _, rows in parts])
        tensors.update({part: piece for (part, _), piece in zip(parts, pieces, strict=True)})
    model_type = c.family
    scaling = {k: v for k, v in (c.rope_scaling or {}).items() if v is not None}
    hf_config = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.mlp_width,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.context_length,
        "rms_norm_eps": c.layer_norm_eps,
        "hidden_act": "silu",
        # transformers 5 reads rope_parameters, earlier versions (and vLLM's) rope_theta and rope_scaling
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta, **scaling},
        **({"rope_scaling": scaling} if scaling else {}),
        "attention_bias": False,
        "attention_dropout": c.dropout,
        "tie_word_embeddings": c.tie_embeddings,
    }
    return write_hf_checkpoint(directory, tensors, hf_config, c, tokenizer)
