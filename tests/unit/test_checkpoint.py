import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from model import GPT, GPTConfig
from model.checkpoint import (
    CheckpointError,
    drop_training_state,
    has_training_state,
    is_adapter,
    load_adapter,
    load_checkpoint,
    load_training_state,
    read_metadata,
    save_checkpoint,
    weights_sha256,
)
from model.classifier import GPTClassifier
from model.lora import LoRAConfig, LoRALinear, apply_lora, has_lora, lora_state_dict
from model.objectives import PretrainObjective
from model.tokenizer import gpt2_tokenizer
from model.trainer import Callback, TrainConfig, Trainer

CONFIG = GPTConfig(vocab_size=50257, context_length=32, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    path = save_checkpoint(tmp_path / "ckpt", model, gpt2_tokenizer(), step=12, metrics={"val_loss": 3.5},
                           parent="abc")
    return model, path


def test_round_trip_keeps_weights_and_metadata(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    loaded, tokenizer, meta = load_checkpoint(path)
    assert isinstance(loaded, GPT) and not loaded.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert meta["task"] == "lm" and meta["step"] == 12 and meta["metrics"] == {"val_loss": 3.5}
    assert meta["parent"] == "abc" and meta["model"] == CONFIG.to_dict()
    assert tokenizer.eot_id == 50256 and meta["tokenizer"] == {"type": "gpt2"}


def test_untied_head_round_trip(tmp_path):
    model = GPT(replace(CONFIG, tie_embeddings=False))
    loaded, _, meta = load_checkpoint(save_checkpoint(tmp_path / "u", model, gpt2_tokenizer()))
    assert meta["model"]["tie_embeddings"] is False
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_classifier_checkpoint_keeps_labels(tmp_path):
    model = GPTClassifier(CONFIG, 2)
    path = save_checkpoint(tmp_path / "c", model, gpt2_tokenizer(), label_names=["ham", "spam"])
    loaded, _, meta = load_checkpoint(path)
    assert isinstance(loaded, GPTClassifier) and loaded.n_classes == 2
    assert meta["task"] == "classifier" and meta["label_names"] == ["ham", "spam"]
    with pytest.raises(ValueError, match="label names"):
        save_checkpoint(tmp_path / "d", model, gpt2_tokenizer(), label_names=["only one"])


def test_lora_checkpoint_rebuilds_the_adapters(tmp_path):
    model = GPT(CONFIG)
    lora = LoRAConfig(rank=2, alpha=4)
    apply_lora(model, lora)
    with pytest.raises(ValueError, match="LoRAConfig"):
        save_checkpoint(tmp_path / "x", model, gpt2_tokenizer())
    path = save_checkpoint(tmp_path / "l", model, gpt2_tokenizer(), lora=lora)
    loaded, _, meta = load_checkpoint(path)
    assert has_lora(loaded) and meta["lora"]["rank"] == 2
    idx = torch.randint(0, 50257, (1, 8))
    assert torch.allclose(loaded(idx)[0], model.eval()(idx)[0])


def test_training_state_round_trip(tmp_path):
    tensors = {"optimizer.0.exp_avg": torch.randn(3, 4), "rng.cpu": torch.get_rng_state()}
    path = save_checkpoint(tmp_path / "t", GPT(CONFIG), gpt2_tokenizer(),
                           training_state=(tensors, {"step": 5}))
    loaded, state = load_training_state(path)
    assert state == {"step": 5} and torch.equal(loaded["optimizer.0.exp_avg"], tensors["optimizer.0.exp_avg"])
    with pytest.raises(CheckpointError, match="no training state"):
        load_training_state(save_checkpoint(tmp_path / "u", GPT(CONFIG), gpt2_tokenizer()))


def test_dropping_the_training_state_keeps_the_model(tmp_path):
    model = GPT(CONFIG).eval()
    tensors = {"optimizer.0.exp_avg": torch.randn(3, 4), "rng.cpu": torch.get_rng_state()}
    path = save_checkpoint(tmp_path / "t", model, gpt2_tokenizer(), training_state=(tensors, {"step": 5}))
    drop_training_state(path)
    assert not has_training_state(path) and sorted(p.name for p in path.iterdir()) == ["config.json",
                                                                                         "model.safetensors"]
    assert set(read_metadata(path)["files"]) == {"model.safetensors"}
    with pytest.raises(CheckpointError, match="no training state"):
        load_training_state(path)
    idx = torch.randint(0, CONFIG.vocab_size, (1, 8))
    assert torch.equal(load_checkpoint(path)[0](idx)[0], model(idx)[0])
    drop_training_state(path)  # again: nothing left to drop


def test_truncated_weights_are_detected(saved):
    _, path = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_corrupted_weights_are_detected(saved):
    _, path = saved
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(path)


def test_mismatched_config_is_detected(saved):
    _, path = saved
    meta = json.loads((path / "config.json").read_text())
    meta["model"]["n_embd"] = 64
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="shapes do not match"):
        load_checkpoint(path)
    meta["model"]["n_layer"] = 3
    meta["model"]["n_embd"] = 32
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)
    meta["model"]["n_head"] = 5
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="divisible"):
        load_checkpoint(path)


def test_missing_or_foreign_files_are_clear_errors(tmp_path, saved):
    _, path = saved
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(tmp_path / "nope")
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_metadata(path)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="not a scratchllm-checkpoint"):
        read_metadata(path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        read_metadata(empty)


def test_saving_over_an_existing_checkpoint_replaces_it_whole(saved):
    model, path = saved
    save_checkpoint(path, model, gpt2_tokenizer(), step=99)
    assert read_metadata(path)["step"] == 99
    assert [p.name for p in path.parent.iterdir()] == ["ckpt"]  # no staging directory left behind


def test_checkpoint_files_are_never_pickles(saved):
    _, path = saved
    for file in path.iterdir():
        assert not file.read_bytes().startswith(b"\x80")  # the pickle protocol marker


LORA = LoRAConfig(rank=2, alpha=4, targets=("c_attn", "c_fc"))


def adapted(base_path):
    """The base checkpoint's model with random LoRA adapters (lora_b too, so they change the logits)."""
    model = load_checkpoint(base_path)[0]
    apply_lora(model, LORA)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_b.normal_(std=0.1)
    return model.eval()


def save_adapter(path, model, base_path):
    return save_checkpoint(path, model, gpt2_tokenizer(), lora=LORA,
                           adapter_of={"sha256": weights_sha256(read_metadata(base_path))})


def test_an_adapter_only_checkpoint_loads_over_its_base(tmp_path, saved):
    base, base_path = saved
    model = adapted(base_path)
    path = save_adapter(tmp_path / "adapter", model, base_path)
    stored = load_file(path / "model.safetensors")
    assert set(stored) == set(lora_state_dict(model)) and all("lora_" in name for name in stored)
    meta = read_metadata(path)
    assert is_adapter(meta) and not is_adapter(read_metadata(base_path))
    assert meta["adapter_of"] == {"sha256": weights_sha256(read_metadata(base_path))}
    loaded, tokenizer, loaded_meta = load_checkpoint(path, base=base_path)
    assert has_lora(loaded) and not loaded.training and loaded_meta == meta and tokenizer.eot_id == 50256
    idx = torch.randint(0, 50257, (2, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
        assert not torch.allclose(loaded(idx)[0], base.eval()(idx)[0], atol=1e-3)
    assert load_checkpoint(base_path, base=tmp_path)[2]["adapter_of"] is None  # a whole checkpoint ignores base
    with pytest.raises(CheckpointError, match="adapter-only"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="adapter-only itself"):
        load_checkpoint(path, base=path)
    other = save_checkpoint(tmp_path / "other", GPT(CONFIG), gpt2_tokenizer())
    with pytest.raises(CheckpointError, match=f"other weights than base {other}"):
        load_checkpoint(path, base=other)


def test_load_adapter_checks_it_fits_the_base(tmp_path, saved):
    _, base_path = saved
    model = adapted(base_path)
    path = save_adapter(tmp_path / "adapter", model, base_path)
    base_meta = read_metadata(base_path)
    adapter = load_adapter(path, base_meta)
    assert adapter.config == LORA and adapter.meta == read_metadata(path)
    assert set(adapter.tensors) == set(lora_state_dict(model))
    assert all(torch.equal(adapter.tensors[name], t) for name, t in lora_state_dict(model).items())
    with pytest.raises(CheckpointError, match="not adapter-only"):
        load_adapter(base_path, base_meta)
    other_meta = read_metadata(save_checkpoint(tmp_path / "other", GPT(CONFIG), gpt2_tokenizer()))
    with pytest.raises(CheckpointError, match="other weights"):
        load_adapter(path, other_meta)
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "lora": {**meta["lora"], "rank": 4}}))
    with pytest.raises(CheckpointError, match="adapter tensor shapes do not match"):
        load_adapter(path, base_meta)
    (path / "config.json").write_text(json.dumps({**meta, "model": {**meta["model"], "n_layer": 3}}))
    with pytest.raises(CheckpointError, match="another model config"):
        load_checkpoint(path, base=base_path)


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_adapter_is_detected(tmp_path, saved, damage):
    _, base_path = saved
    path = save_adapter(tmp_path / "adapter", adapted(base_path), base_path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        del data[-50:]
    else:
        data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=damage):
        load_checkpoint(path, base=base_path)
    with pytest.raises(CheckpointError, match=damage):
        load_adapter(path, read_metadata(base_path))


def test_only_lora_language_models_save_adapter_only(tmp_path, saved):
    _, base_path = saved
    adapter_of = {"sha256": weights_sha256(read_metadata(base_path))}
    with pytest.raises(ValueError, match="LoRA adapters"):
        save_checkpoint(tmp_path / "a", GPT(CONFIG), gpt2_tokenizer(), lora=LORA, adapter_of=adapter_of)
    with pytest.raises(ValueError, match="LoRA adapters"):
        save_checkpoint(tmp_path / "a", adapted(base_path), gpt2_tokenizer(), adapter_of=adapter_of)
    classifier = GPTClassifier(CONFIG, 2)
    apply_lora(classifier, LORA, trainable=(classifier.head,))
    with pytest.raises(ValueError, match="classifier"):
        save_checkpoint(tmp_path / "a", classifier, gpt2_tokenizer(), label_names=["x", "y"], lora=LORA,
                        adapter_of=adapter_of)
    assert not (tmp_path / "a").exists()


class StopAfter(Callback):
    def __init__(self, steps: int):
        self.steps, self.done = steps, 0

    def on_progress(self, progress):
        self.done += 1

    def should_stop(self):
        return self.done >= self.steps


def test_an_adapter_only_run_resumes_exactly(tmp_path, saved):
    _, base_path = saved
    adapter_of = {"sha256": weights_sha256(read_metadata(base_path))}
    tokens = np.random.default_rng(0).integers(0, 50257, 400).astype(np.uint16)
    config = TrainConfig(max_steps=6, learning_rate=3e-3, checkpoint_interval=2, eval_batches=1)

    def trainer(out, model, callback=None):
        objective = PretrainObjective(tokens[:300], tokens[300:], block_size=16, batch_size=2, seed=3)
        return Trainer(model.train(), objective, config, gpt2_tokenizer(), out, callback, seed=5, lora=LORA,
                       adapter_of=adapter_of)

    def fresh():
        torch.manual_seed(1)
        return adapted(base_path)

    full = trainer(tmp_path / "full", fresh()).train()
    interrupted = trainer(tmp_path / "part", fresh(), StopAfter(3)).train()
    assert interrupted.status == "stopped" and is_adapter(read_metadata(interrupted.checkpoint))
    resumed = trainer(tmp_path / "part", load_checkpoint(interrupted.checkpoint, base=base_path)[0])
    resumed.resume(interrupted.checkpoint)
    rest = resumed.train()
    assert interrupted.train_losses + rest.train_losses == full.train_losses
    final = load_checkpoint(rest.checkpoint, base=base_path)[0].state_dict()
    for name, tensor in load_checkpoint(full.checkpoint, base=base_path)[0].state_dict().items():
        assert torch.equal(final[name], tensor), name
