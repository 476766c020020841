"""Checkpoints: a directory of safetensors + JSON, never pickles.

    model.safetensors      the weights; in an adapter-only checkpoint, the LoRA tensors alone
    config.json            model config, tokenizer spec, task (`lm` | `classifier`) and label names, prompt
                           format (the chat template of an instruction model), step, metrics, parent
                           checkpoint, LoRA config, the sha256 of the base weights an adapter-only checkpoint
                           was trained on (`adapter_of`), and the size and sha256 of each file
    training.safetensors   optional, for resuming: optimizer tensors and RNG states
    training.json          optional, for resuming: optimizer hyperparameters, scheduler, data position

A checkpoint is written into a temporary directory and renamed into place, so a crash never leaves a
half-written one under the final name; the recorded sha256 catches truncation and corruption later.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from model.classifier import GPTClassifier
from model.config import ConfigError, GPTConfig
from model.gpt import GPT
from model.json_text import parse_json
from model.lora import Adapter, LoRAConfig, apply_lora, has_lora, lora_state_dict, merge_lora
from model.tokenizer import Tokenizer, tokenizer_from_spec

FORMAT = "scratchllm-checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TRAINING_TENSORS = "training.safetensors"
TRAINING_JSON = "training.json"
TASKS = ("lm", "classifier")


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or does not match its config."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().contiguous().cpu() for name, t in tensors.items()}


def save_checkpoint(path: str | os.PathLike, model: nn.Module, tokenizer: Tokenizer, *, step: int = 0,
                    metrics: dict | None = None, label_names: list[str] | None = None,
                    parent: str | None = None, lora: LoRAConfig | None = None, prompt_format: str | None = None,
                    training_state: tuple[dict[str, torch.Tensor], dict] | None = None,
                    extra: dict | None = None, adapter_of: dict | None = None) -> Path:
    """Write model (a GPT or GPTClassifier) and its metadata to the directory path; returns the path.

    training_state is (tensors, json) as the Trainer produces it, stored for an exact resume. adapter_of
    ({"sha256": weights_sha256 of the base checkpoint's metadata}) makes the checkpoint adapter-only: it holds
    the LoRA tensors of a language model alone, and loads over that base.
    """
    path = Path(path)
    task = "classifier" if isinstance(model, GPTClassifier) else "lm"
    if task == "classifier" and (label_names is None or len(label_names) != model.n_classes):
        raise ValueError(f"a classifier with {model.n_classes} classes needs as many label names")
    if has_lora(model) and lora is None:
        raise ValueError("the model has LoRA adapters: pass their LoRAConfig")
    if adapter_of is not None:
        if lora is None or not has_lora(model):
            raise ValueError("an adapter-only checkpoint needs a model with LoRA adapters and their LoRAConfig")
        if task != "lm":
            raise ValueError("only a language model's adapters are saved alone: a classifier's head is no adapter")
        if not isinstance(adapter_of.get("sha256"), str):
            raise ValueError("adapter_of must hold the sha256 of the base checkpoint's weights")
    weights = model.state_dict() if adapter_of is None else lora_state_dict(model)
    config = model.config
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(_contiguous(weights), staging / WEIGHTS)
        files = [WEIGHTS]
        if training_state is not None:
            tensors, state = training_state
            save_file(_contiguous(tensors), staging / TRAINING_TENSORS)
            (staging / TRAINING_JSON).write_text(json.dumps(state, indent=1))
            files += [TRAINING_TENSORS, TRAINING_JSON]
        meta = {
            "format": FORMAT, "version": VERSION, "task": task, "model": config.to_dict(),
            "tokenizer": tokenizer.spec(), "label_names": label_names if task == "classifier" else None,
            "prompt_format": prompt_format, "step": step, "metrics": metrics or {}, "parent": parent,
            "lora": lora.to_dict() if lora is not None else None, "adapter_of": adapter_of, **(extra or {}),
            "files": {name: {"bytes": (staging / name).stat().st_size, "sha256": _sha256(staging / name)}
                      for name in files},
        }
        (staging / CONFIG).write_text(json.dumps(meta, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint, checked for format and required fields (weights not read)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory")
    try:
        meta = parse_json((path / CONFIG).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path} has no {CONFIG}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{CONFIG} of checkpoint {path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} directory")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint version {meta.get('version')!r} is not supported (want {VERSION})")
    missing = [k for k in ("task", "model", "tokenizer", "files") if k not in meta]
    if missing:
        raise CheckpointError(f"{CONFIG} of checkpoint {path} lacks {', '.join(missing)}")
    if meta["task"] not in TASKS:
        raise CheckpointError(f"unknown checkpoint task {meta['task']!r}")
    return meta


def _verified(path: Path, meta: dict, name: str) -> Path:
    expected = meta["files"].get(name)
    file = path / name
    if expected is None or not file.is_file():
        raise CheckpointError(f"checkpoint {path} lacks {name}")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"{name} of checkpoint {path} is truncated or altered: "
                              f"{size} bytes, {expected['bytes']} recorded")
    if _sha256(file) != expected["sha256"]:
        raise CheckpointError(f"{name} of checkpoint {path} is corrupted: its sha256 does not match")
    return file


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e


def is_adapter(meta: dict) -> bool:
    """Whether the checkpoint holds LoRA tensors alone, to load over the base checkpoint they were trained on."""
    return meta.get("adapter_of") is not None


def weights_sha256(meta: dict) -> str:
    """The recorded sha256 of a checkpoint's model.safetensors: what an adapter-only checkpoint knows its base by."""
    try:
        return meta["files"][WEIGHTS]["sha256"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"the checkpoint records no sha256 of its {WEIGHTS}") from e


def _model_config(meta: dict) -> GPTConfig:
    try:
        return GPTConfig.from_dict(meta["model"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"invalid model config in checkpoint: {e}") from e


def _lora_config(meta: dict) -> LoRAConfig:
    try:
        return LoRAConfig(**meta["lora"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid LoRA config in checkpoint: {e}") from e


def build_model(meta: dict) -> nn.Module:
    """An untrained model of the checkpoint's architecture, task and adapters."""
    config = _model_config(meta)
    if meta["task"] == "classifier":
        labels = meta.get("label_names") or []
        model = GPTClassifier(config, len(labels))
    else:
        model = GPT(config)
    if meta.get("lora"):
        apply_lora(model, _lora_config(meta), trainable=(model.head,) if isinstance(model, GPTClassifier) else ())
    return model


def _check_tensors(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str) -> None:
    """CheckpointError unless tensors have exactly the names and shapes of expected."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{what}s do not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    wrong = [f"{k} {tuple(tensors[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tensors[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{what} shapes do not match the config: {'; '.join(wrong[:5])}")


def _adapter_shapes(config: GPTConfig, lora: LoRAConfig) -> dict[str, torch.Tensor]:
    """The LoRA tensors of config's GPT adapted by lora, on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        model = GPT(config)
    try:
        apply_lora(model, lora)
    except ValueError as e:  # targets no layer
        raise CheckpointError(f"invalid LoRA config in checkpoint: {e}") from e
    return lora_state_dict(model)


def _adapter(path: Path, meta: dict, base_meta: dict, base_name: str) -> Adapter:
    """The adapter of the adapter-only checkpoint at path, checked to fit the base of base_meta."""
    if not is_adapter(meta):
        raise CheckpointError(f"checkpoint {path} is not adapter-only: it holds a whole model")
    if meta["task"] != "lm":
        raise CheckpointError(f"adapter checkpoint {path} has task {meta['task']!r}: only a language model's "
                              f"adapters load alone")
    trained_on = meta["adapter_of"].get("sha256") if isinstance(meta["adapter_of"], dict) else None
    if trained_on != weights_sha256(base_meta):
        raise CheckpointError(f"adapter checkpoint {path} was trained on other weights than {base_name}")
    config = _model_config(meta)
    if config != _model_config(base_meta):
        raise CheckpointError(f"adapter checkpoint {path} has another model config than {base_name}")
    lora = _lora_config(meta)
    tensors = _load_tensors(_verified(path, meta, WEIGHTS))
    _check_tensors(_adapter_shapes(config, lora), tensors, "adapter tensor")
    return Adapter(lora, tensors, meta)


def load_adapter(path: str | os.PathLike, base_meta: dict) -> Adapter:
    """The adapter of an adapter-only checkpoint, to serve over the base checkpoint of metadata base_meta
    (model.multi_lora); CheckpointError if broken or trained on another base."""
    path = Path(path)
    return _adapter(path, read_metadata(path), base_meta, "its base")


def _load_full(path: Path, meta: dict) -> nn.Module:
    tensors = _load_tensors(_verified(path, meta, WEIGHTS))
    model = build_model(meta)
    _check_tensors(model.state_dict(), tensors, "weight")
    model.load_state_dict(tensors)
    return model


def _load_adapted(path: Path, meta: dict, base: str | os.PathLike | None) -> nn.Module:
    if base is None:
        raise CheckpointError(f"checkpoint {path} is adapter-only: it loads over its base, the checkpoint it was "
                              f"trained on")
    base_meta = read_metadata(base)
    if is_adapter(base_meta):
        raise CheckpointError(f"base {base} of adapter checkpoint {path} is adapter-only itself")
    adapter = _adapter(path, meta, base_meta, f"base {base}")  # checked before the base's weights are read
    model = merge_lora(_load_full(Path(base), base_meta))  # a base's own adapters are part of its weights
    apply_lora(model, adapter.config)
    model.load_state_dict(adapter.tensors, strict=False)  # the base's weights are loaded already
    return model


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    base: str | os.PathLike | None = None) -> tuple[nn.Module, Tokenizer, dict]:
    """(model in eval mode, tokenizer, metadata) of a checkpoint directory; CheckpointError if broken.

    An adapter-only checkpoint loads over base, the directory of the checkpoint it was trained on: the base's
    model with the adapters as unmerged LoRA layers, and the adapter checkpoint's metadata. A whole checkpoint
    ignores base, so a caller may pass any checkpoint's parent.
    """
    path = Path(path)
    meta = read_metadata(path)
    model = _load_adapted(path, meta, base) if is_adapter(meta) else _load_full(path, meta)
    try:
        tokenizer = tokenizer_from_spec(meta["tokenizer"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"invalid tokenizer spec in checkpoint: {e}") from e
    return model.to(device).eval(), tokenizer, meta


def drop_training_state(path: str | os.PathLike) -> None:
    """Remove what a resume needs (optimizer state, random states) from a checkpoint; its model stays whole."""
    path = Path(path)
    meta = read_metadata(path)
    # training.json first: a checkpoint without it is one no resume picks, whatever else a crash leaves behind
    (path / TRAINING_JSON).unlink(missing_ok=True)
    meta["files"] = {name: entry for name, entry in meta["files"].items()
                     if name not in (TRAINING_TENSORS, TRAINING_JSON)}
    staging = path / f".{CONFIG}.new"
    staging.write_text(json.dumps(meta, indent=1))
    os.replace(staging, path / CONFIG)
    (path / TRAINING_TENSORS).unlink(missing_ok=True)


def has_training_state(path: str | os.PathLike) -> bool:
    """Whether the checkpoint directory holds what a resume needs (a copy for serving may not)."""
    return (Path(path) / TRAINING_JSON).is_file()


def load_training_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) saved for resuming, as passed to save_checkpoint."""
    path = Path(path)
    meta = read_metadata(path)
    if TRAINING_TENSORS not in meta["files"]:
        raise CheckpointError(f"checkpoint {path} holds no training state to resume from")
    tensors = _load_tensors(_verified(path, meta, TRAINING_TENSORS))
    try:
        state = json.loads(_verified(path, meta, TRAINING_JSON).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{TRAINING_JSON} of checkpoint {path} is not valid JSON: {e}") from e
    return tensors, state
