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
from typing import NamedTuple, TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from model.config import GPTConfig
from model.gpt import GPT
from model.hf_tokenizer import hf_tokenizer_files
from model.json_text import parse_json
from model.lora import has_lora
from model.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
GENERATION_CONFIG = "generation_config.json"
GPT2_EOT_ID = 50256
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # the tanh approximation our MLP computes
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The causal-mask buffers that older transformers versions saved with every block; they hold no weights.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
BLOCK_KEY = re.compile(r"h\.(\d+)\..+")
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes a weight may have
# The config fields that size each tensor a wrong shape can name; a block's tensors are sized by n_embd.
SHAPE_FIELDS = {"wte.weight": "vocab_size and n_embd", "wpe.weight": "n_positions and n_embd",
                "lm_head.weight": "vocab_size and n_embd"}
T = TypeVar("T")


class TensorHeader(NamedTuple):
    shape: tuple[int, ...]
    floating: bool


def _hf_name(ours: str) -> str:
    return ours.replace("blocks.", "h.", 1) if ours.startswith("blocks.") else ours


def _is_conv1d(hf_name: str) -> bool:
    return hf_name.startswith("h.") and hf_name.endswith(CONV1D_WEIGHTS)


def _listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:6])
    return shown if len(names) <= 6 else f"{shown} and {len(names) - 6} more"


def check_keys(expected, present) -> None:
    """ValueError naming the tensors of expected that present lacks, then those present has beyond them."""
    if missing := set(expected) - set(present):
        raise ValueError(f"missing key(s): {_listing(missing)}")
    if unexpected := set(present) - set(expected):
        raise ValueError(f"unexpected key(s): {_listing(unexpected)}")


def read_tensors(files: list[Path]) -> dict[str, Tensor]:
    """Every tensor of the safetensors files (a checkpoint's shards); ValueError for a file that is not one."""
    state = {}
    for file in files:
        try:
            state.update(load_file(file))
        except SafetensorError as e:
            raise ValueError(f"{file} is not a readable safetensors file: {e}") from e
    return state


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint directory's weight files (model.safetensors, or the shards its index names); ValueError
    for a directory holding only pickles."""
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / WEIGHTS_INDEX).is_file():
        return [path / shard for shard in sorted(set(parse_json((path / WEIGHTS_INDEX).read_text())["weight_map"]
                                                     .values()))]
    others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if others:
        raise ValueError(f"{path} has no {WEIGHTS}, only {', '.join(others)}: pickled checkpoints are "
                         f"not loaded because unpickling can run code; convert them to safetensors")
    raise ValueError(f"{path} has no {WEIGHTS}")


def _read_headers(files: list[Path]) -> dict[str, TensorHeader]:
    """Every tensor's shape and dtype, from the files' headers: no tensor is read."""
    headers = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    tensor = f.get_slice(name)
                    headers[name] = TensorHeader(tuple(tensor.get_shape()), tensor.get_dtype() in FLOAT_DTYPES)
        except SafetensorError as e:
            raise ValueError(f"{file} is not a readable safetensors file: {e}") from e
    return headers


def _hf_state(state: Mapping[str, T]) -> dict[str, T]:
    """The tensors (or their headers) under GPT2Model's names: `transformer.` dropped, mask buffers left out."""
    out = {}
    for key, tensor in state.items():
        name = key.removeprefix("transformer.")
        if MASK_BUFFER.fullmatch(name):
            continue
        if name in out:
            raise ValueError(f"state dict has {name!r} both with and without the 'transformer.' prefix")
        out[name] = tensor
    return out


def _gpt_config(hf: dict, headers: dict[str, TensorHeader]) -> GPTConfig:
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
        if key not in headers:
            raise ValueError(f"missing key {key!r}")
    if "n_head" not in hf:
        raise ValueError("n_head cannot be read off the weights: pass it in config, "
                         "e.g. config={'n_head': 12}")
    n_blocks = len({int(m.group(1)) for m in map(BLOCK_KEY.fullmatch, headers) if m})
    n_layer = hf.get("n_layer", n_blocks)
    # Checked before any per-layer work: a config may claim any number of layers.
    if n_layer != n_blocks:
        raise ValueError(f"n_layer is {n_layer!r} but the weights hold {n_blocks} blocks (h.0, h.1, ...)")
    vocab_size, n_embd = headers["wte.weight"].shape
    n_embd = hf.get("n_embd", n_embd)
    n_inner = hf.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        raise ValueError(f"n_inner is {n_inner}; our GPT's MLP is 4 * n_embd = {4 * n_embd} wide")
    # Our GPT has one dropout rate where GPT-2 has three; they matter only for training.
    dropouts = [hf[k] for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop") if hf.get(k) is not None]
    return GPTConfig(
        vocab_size=hf.get("vocab_size", vocab_size),
        context_length=hf.get("n_positions", hf.get("n_ctx", headers["wpe.weight"].shape[0])),
        n_layer=n_layer,
        n_head=hf["n_head"],
        n_embd=n_embd,
        dropout=max(dropouts, default=0.0),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
    )


def hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a GPT2Model with this config, under its names and in its layout (Conv1D
    weights [in, out]), computed from the config so that a checkpoint is checked before a module is built."""
    c, bias = config.n_embd, config.bias
    vector = {"weight": (c,), **({"bias": (c,)} if bias else {})}
    shapes = {"wte.weight": (config.vocab_size, c), "wpe.weight": (config.context_length, c),
              **{f"ln_f.{k}": v for k, v in vector.items()}}
    block = {**{f"ln_1.{k}": v for k, v in vector.items()}, **{f"ln_2.{k}": v for k, v in vector.items()},
             "attn.c_attn.weight": (c, 3 * c), "attn.c_proj.weight": (c, c),
             "mlp.c_fc.weight": (c, 4 * c), "mlp.c_proj.weight": (4 * c, c)}
    if config.qkv_bias:
        block["attn.c_attn.bias"] = (3 * c,)
    if bias:
        block.update({"attn.c_proj.bias": (c,), "mlp.c_fc.bias": (4 * c,), "mlp.c_proj.bias": (c,)})
    for layer in range(config.n_layer):
        shapes.update({f"h.{layer}.{name}": shape for name, shape in block.items()})
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, c)
    return shapes


def _check_tensors(config: GPTConfig, headers: dict[str, TensorHeader]) -> None:
    """Every tensor the config needs is there, with its shape and a floating-point dtype, and no other."""
    expected = hf_shapes(config)
    check_keys(expected, headers)
    for name, shape in expected.items():
        header = headers[name]
        if header.shape != shape:
            fields = SHAPE_FIELDS.get(name, "n_embd")
            raise ValueError(f"{name}: checkpoint shape {list(header.shape)}, the config needs {list(shape)} "
                             f"(from {fields})")
        if not header.floating:
            raise ValueError(f"{name}: the tensor is not floating point")


def _open(path_or_state_dict) -> tuple[dict[str, Tensor], dict, list[Path], dict[str, TensorHeader]]:
    """The tensors given (none yet from a directory), config.json, the files to read tensors from and every
    tensor's header."""
    if isinstance(path_or_state_dict, Mapping):
        state = dict(path_or_state_dict)
        return state, {}, [], {name: TensorHeader(tuple(t.shape), t.is_floating_point()) for name, t in state.items()}
    path = Path(path_or_state_dict)
    if not path.is_dir():
        raise ValueError(f"{path} is not a checkpoint directory")
    hf_config = parse_json((path / CONFIG).read_text()) if (path / CONFIG).is_file() else {}
    files = safetensors_files(path)
    return {}, hf_config, files, _read_headers(files)


def import_hf_gpt2(path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
                   config: dict | None = None) -> GPT:
    """A GPT (float32, eval mode) holding a Hugging Face GPT-2 checkpoint's weights.

    path_or_state_dict is a directory with model.safetensors (or its shards) and config.json, or a
    state dict of GPT2LMHeadModel / GPT2Model tensors. config holds GPT2Config fields (n_head, n_layer,
    n_embd, n_positions, vocab_size, layer_norm_epsilon, *_pdrop); they override config.json. Sizes
    missing from both are read off the tensor shapes, except n_head, which the shapes do not show.
    Anything that does not fit our GPT exactly raises ValueError naming the key or setting; the config and
    every tensor's shape are checked before a tensor is read from a file or a module is built.
    """
    state, hf_config, files, headers = _open(path_or_state_dict)
    hf_config = {**hf_config, **(config or {})}
    headers = _hf_state(headers)
    gpt_config = _gpt_config(hf_config, headers)
    tied = hf_config.get("tie_word_embeddings")
    # A stored head is checked like any tensor; whether it is a copy of wte.weight is known once read.
    _check_tensors(replace(gpt_config, tie_embeddings=tied is not False and "lm_head.weight" not in headers),
                   headers)

    state = _hf_state({**state, **read_tensors(files)})
    # As in transformers, tie_word_embeddings (default true) decides and a tied head's stored copy is
    # ignored. A bare state dict has no config: a head that differs from wte.weight is an untied head.
    lm_head = state.get("lm_head.weight")
    if tied is None:
        tied = lm_head is None or torch.equal(lm_head, state["wte.weight"].to(lm_head))
    if tied:
        state.pop("lm_head.weight", None)
    else:
        gpt_config = replace(gpt_config, tie_embeddings=False)

    with torch.device("meta"):
        model = GPT(gpt_config)
    ours = {}
    for name in model.state_dict():
        hf = _hf_name(name)
        tensor = state[hf].t() if _is_conv1d(hf) else state[hf]
        # A copy, so the model never shares memory with the caller's state dict.
        ours[name] = tensor.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    model.load_state_dict(ours, assign=True)
    return model.eval()


def _check_gpt2_expresses(c: GPTConfig) -> None:
    if not (c.qkv_bias and c.bias):
        raise ValueError(f"GPT-2 has biases on every linear layer and LayerNorm; this model has "
                         f"qkv_bias={c.qkv_bias}, bias={c.bias}, which Hugging Face GPT-2 cannot express")
    gpt2 = {"position": (c.position, "learned"), "norm": (c.norm, "layernorm"), "mlp": (c.mlp, "gelu"),
            "mlp_hidden": (c.mlp_width, 4 * c.n_embd), "n_kv_head": (c.kv_heads, c.n_head),
            "qk_norm": (c.qk_norm, False)}
    unlike = [f"{name}={ours!r}" for name, (ours, theirs) in gpt2.items() if ours != theirs]
    if unlike:
        raise ValueError(f"this model has {', '.join(unlike)}, which Hugging Face GPT-2 cannot express: it has "
                         f"learned positions, LayerNorm, a GELU MLP 4 x n_embd wide, one key/value head per "
                         f"query head and no qk_norm")


def export_hf_gpt2(model: GPT, path: str | os.PathLike, tokenizer: Tokenizer | None = None) -> Path:
    """Write model as a Hugging Face GPT-2 checkpoint directory that GPT2LMHeadModel.from_pretrained loads. Given
    the model's tokenizer, its files for AutoTokenizer.from_pretrained (model.hf_tokenizer) and its end-of-text id
    go along; without one, GPT-2's id is assumed. ValueError, before anything is written, for what Hugging Face
    GPT-2 cannot express."""
    if not isinstance(model, GPT):
        raise ValueError(f"only a GPT language model can be exported as GPT-2, got {type(model).__name__}")
    if has_lora(model):
        raise ValueError("the model has LoRA adapters: merge them first with model.lora.merge_lora")
    c = model.config
    _check_gpt2_expresses(c)
    tensors = {}
    for name, tensor in model.state_dict().items():
        hf = _hf_name(name)
        tensors[hf] = tensor.t() if _is_conv1d(hf) else tensor
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
    return write_hf_checkpoint(path, tensors, hf_config, c, tokenizer)


def write_hf_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], hf_config: dict, config: GPTConfig,
                        tokenizer: Tokenizer | None) -> Path:
    """Write a Hugging Face checkpoint directory: the tensors, config.json with the end-of-text id as bos and eos
    (GPT-2's without a tokenizer) and the tokenizer's files (ValueError, before anything is written, for a
    tokenizer they cannot express)."""
    tokenizer_files = hf_tokenizer_files(tokenizer, config.context_length) if tokenizer is not None else {}
    eot_id = GPT2_EOT_ID if tokenizer is None else tokenizer.eot_id
    # An end-of-text id outside the vocabulary (GPT-2's, for a smaller one) makes transformers warn.
    special_ids = {"bos_token_id": eot_id, "eos_token_id": eot_id} if eot_id < config.vocab_size else {}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, path / WEIGHTS,
              metadata={"format": "pt"})
    (path / CONFIG).write_text(json.dumps({**hf_config, **special_ids}, indent=2) + "\n")
    if special_ids:  # as save_pretrained writes it: servers such as vLLM read the stop token from there
        (path / GENERATION_CONFIG).write_text(json.dumps(special_ids, indent=2) + "\n")
    for name, text in tokenizer_files.items():
        (path / name).write_text(text, encoding="utf-8")
    return path
