import json
from dataclasses import replace

import pytest
import torch

from model import GPT, GPTConfig
from model.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_training_state,
    read_metadata,
    save_checkpoint,
)
from model.classifier import GPTClassifier
from model.lora import LoRAConfig, apply_lora, has_lora
from model.tokenizer import gpt2_tokenizer

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
