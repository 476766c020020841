"""Hugging Face GPT-2 checkpoints in and out: safetensors + config.json, as published for `gpt2`.

Our GPT has the same parameters as Hugging Face's GPT2LMHeadModel under nearly the same names
(`blocks.N` is their `h.N`). Their linear layers are `Conv1D` modules that store weights as [in, out];
ours are nn.Linear [out, in], so those four matrices per block are transposed on the way in and out.
Pickled checkpoints (pytorch_model.bin) are refused: unpickling can run arbitrary code.
"""

import json
import os
import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.config import GPTConfig
from model.gpt import GPT
from model.json_text import parse_json
from model.lora import has_lora

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
GPT2_EOT_ID = 50256
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation our MLP computes
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The causal-mask buffers that older transformers versions saved with every block; they hold no weights.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
BLOCK_KEY = re.compile(r"h\.(\d+)\..+")


def _hf_name(ours: str) -> str:
    return ours.replace("blocks.", "h.", 1) if ours.startswith("blocks.") else ours


def _is_conv1d(hf_name: str) -> bool:
    return hf_name.startswith("h.") and hf_name.endswith(CONV1D_WEIGHTS)


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:6])
    return shown if len(names) <= 6 else f"{shown} and {len(names) - 6} more"


def _shape(t: Tensor) -> list[int]:
    return list(t.shape)


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(file)
    except SafetensorError as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e


def _read_directory(path: Path) -> tuple[dict[str, Tensor], dict]:
    config = parse_json((path / CONFIG).read_text()) if (path / CONFIG).is_file() else {}
    if (path / WEIGHTS).is_file():
        return _read_safetensors(path / WEIGHTS), config
    if (path / WEIGHTS_INDEX).is_file():
        shards = sorted(set(parse_json((path / WEIGHTS_INDEX).read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(_read_safetensors(path / shard))
        return state, config
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if others:
        raise ValueError(f"{path} has no {WEIGHTS}, only {', '.join(others)}: pickled checkpoints are "
                         f"not loaded because unpickling can run code; convert them to safetensors")
    raise ValueError(f"{path} has no {WEIGHTS}")


def _hf_state(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors under GPT2Model's names: `transformer.` dropped, mask buffers left out."""
    out = {}
    for key, tensor in state.items():
        name = key.removeprefix("transformer.")
        if MASK_BUFFER.fullmatch(name):
            continue
        if name in out:
            raise ValueError(f"state dict has {name!r} both with and without the 'transformer.' prefix")
        out[name] = tensor
    return out


def _gpt_config(hf: dict, state: dict[str, Tensor]) -> GPTConfig:
    """GPTConfig from Hugging Face GPT2Config fields, with the sizes it lacks read off the tensors."""
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"model_type is {hf['model_type']!r}, not 'gpt2': only GPT-2 checkpoints "
                         f"can be imported")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GELU_TANH:
        raise ValueError(f"activation_function is {activation!r}; our GPT computes the tanh GELU "
                         f"({' or '.join(GELU_TANH)})")
    if hf.get("add_cross_attention"):
        raise ValueError("add_cross_attention is set: our GPT has no cross-attention layers")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        raise ValueError("scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True: our GPT "
                         "always scales attention scores by 1/sqrt(head_dim)")
    for key in ("wte.weight", "wpe.weight"):
        if key not in state:
            raise ValueError(f"missing key {key!r}")
    if "n_head" not in hf:
        raise ValueError("n_head cannot be read off the weights: pass it in config, "
                         "e.g. config={'n_head': 12}")
    blocks = {int(m.group(1)) for m in map(BLOCK_KEY.fullmatch, state) if m}
    vocab_size, n_embd = state["wte.weight"].shape
    n_embd = hf.get("n_embd", n_embd)
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise ValueError(f"n_inner is {n_inner}; our GPT's MLP is 4 * n_embd = {4 * n_embd} wide")
    # Our GPT has one dropout rate where GPT-2 has three; they matter only for training.
    dropouts = [hf[k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop") if hf.get(k) is not None]
    return GPTConfig(
        vocab_size=hf.get("vocab_size", vocab_size),
        context_length=hf.get("n_positions", hf.get("n_ctx", state["wpe.weight"].shape[0])),
        n_layer=hf.get("n_layer", max(blocks, default=-1) + 1),
        n_head=hf["n_head"],
        n_embd=n_embd,
        dropout=max(dropouts, default=0.0),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def import_hf_gpt2(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
                   config: dict | None = None) -> GPT:
    """A GPT (float32, eval mode) holding a Hugging Face GPT-2 checkpoint's weights.

    path_or_state_dict is a directory with model.safetensors (or its shards) and config.json, or a
    state dict of GPT2LMHeadModel / GPT2Model tensors. config holds GPT2Config fields (n_head, n_layer,
    n_embd, n_positions, vocab_size, layer_norm_epsilon, *_pdrop); they override config.json. Sizes
    missing from both are read off the tensor shapes, except n_head, which the shapes do not show.
    Anything that does not fit our GPT exactly raises ValueError naming the key or setting.
    """
    if isinstance(path_or_state_dict, Mapping):
        state, hf_config = dict(path_or_state_dict), {}
    else:
        path = Path(path_or_state_dict)
        if not path.is_dir():
            raise ValueError(f"{path} is not a checkpoint directory")
        state, hf_config = _read_directory(path)
    hf_config = {**hf_config, **(config or {})}
    state = _hf_state(state)

    gpt_config = _gpt_config(hf_config, state)
    # As in transformers, tie_word_embeddings (default true) decides and a tied head's stored copy is
    # ignored. A bare state dict has no config: a head that differs from wte.weight is an untied head.
    lm_head = state.get("lm_head.weight")
    tied = hf_config.get("tie_word_embeddings")
    if tied is None:
        tied = lm_head is None or torch.equal(lm_head, state["wte.weight"].to(lm_head))
    if tied:
        state.pop("lm_head.weight", None)
    else:
        gpt_config = replace(gpt_config, tie_embeddings=False)

    with torch.device("meta"):
        model = GPT(gpt_config)
    expected = {_hf_name(name): param for name, param in model.state_dict().items()}
    missing = expected.keys() - state.keys()
    if missing:
        raise ValueError(f"missing key(s): {_listing(missing)}")
    unexpected = state.keys() - expected.keys()
    if unexpected:
        raise ValueError(f"unexpected key(s): {_listing(unexpected)}")

    ours = {}
    for name, param in model.state_dict().items():
        hf = _hf_name(name)
        tensor = state[hf].t() if _is_conv1d(hf) else state[hf]
        if tensor.shape != param.shape:
            want = param.shape[::-1] if _is_conv1d(hf) else param.shape
            raise ValueError(f"{hf}: checkpoint shape {_shape(state[hf])}, the config needs {list(want)}")
        # A copy, so the model never shares memory with the caller's state dict.
        ours[name] = tensor.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    model.load_state_dict(ours, assign=True)
    return model.eval()


def export_hf_gpt2(model: GPT, path: str | os.PathLike) -> Path:
    """Write model as a Hugging Face GPT-2 checkpoint directory that GPT2LMHeadModel.from_pretrained loads."""
    if not isinstance(model, GPT):
        raise ValueError(f"only a GPT language model can be exported as GPT-2, got {type(model).__name__}")
    if has_lora(model):
        raise ValueError("the model has LoRA adapters: merge them first with model.lora.merge_lora")
    c = model.config
    if not (c.qkv_bias and c.bias):
        raise ValueError(f"GPT-2 has biases on every linear layer and LayerNorm; this model has "
                         f"qkv_bias={c.qkv_bias}, bias={c.bias}, which Hugging Face GPT-2 cannot express")

    tensors = {}
    for name, tensor in model.state_dict().items():
        hf = _hf_name(name)
        tensor = tensor.t() if _is_conv1d(hf) else tensor
        tensors[hf] = tensor.detach().cpu().contiguous()
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_ctx": c.context_length,
        "n_positions": c.context_length,
        "n_embd": c.n_embd,
        "n_head": c.n_head,
        "n_layer": c.n_layer,
        "vocab_size": c.vocab_size,
        "layer_norm_epsilon": c.layer_norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "tie_word_embeddings": c.tie_embeddings,
    }
    # GPT-2's <|endoftext|> id would point outside a smaller vocabulary, which transformers warns about.
    if c.vocab_size > GPT2_EOT_ID:
        hf_config.update(bos_token_id=GPT2_EOT_ID, eos_token_id=GPT2_EOT_ID)

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
    return path
