import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import GPT, GPTConfig
from model.hf_gpt2 import export_hf_gpt2, hf_shapes, import_hf_gpt2
from model.lora import LoRAConfig, apply_lora

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)
TOLERANCE = 1e-4


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random LayerNorm weights and biases too, so a swapped or dropped vector changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.dim() == 2:
            param.copy_(0.02 * noise)
        elif name.endswith("weight"):
            param.copy_(1 + 0.2 * noise)
        else:
            param.copy_(0.1 * noise)


def hf_gpt2(**config) -> "transformers.GPT2LMHeadModel":
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config, attn_implementation="sdpa"))
    randomise(model)
    return model.eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_difference(ours: GPT, hf, idx: torch.Tensor) -> float:
    return (ours(idx)[0] - hf(idx).logits).abs().max().item()


@pytest.fixture(scope="module")
def small_hf():
    return hf_gpt2(**SMALL)


@pytest.fixture
def small_state(small_hf):
    return {name: t.clone() for name, t in small_hf.state_dict().items()}


def test_import_saved_pretrained_directory(small_hf, tmp_path):
    small_hf.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    ours = import_hf_gpt2(tmp_path)
    assert ours.config == GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128, dropout=0.1)
    assert not ours.training
    assert max_logit_difference(ours, small_hf, tokens(2, 32)) < TOLERANCE


def test_import_state_dict_infers_sizes_and_copies(small_hf, small_state):
    ours = import_hf_gpt2(small_state, {"n_head": 4})
    assert ours.config == GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128, dropout=0.0)
    assert max_logit_difference(ours, small_hf, tokens(2, 32)) < TOLERANCE
    small_state["transformer.wte.weight"].zero_()
    assert ours.wte.weight.abs().sum() > 0


def test_import_published_layout_ignores_mask_buffers(small_hf, small_state):
    """The published gpt2 repo has no `transformer.` prefix and stores each block's causal mask."""
    state = {name.removeprefix("transformer."): t for name, t in small_state.items()}
    del state["lm_head.weight"]
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    ours = import_hf_gpt2(state, small_hf.config.to_dict())
    assert max_logit_difference(ours, small_hf, tokens(2, 32)) < TOLERANCE


def test_export_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=64, context_length=128, dropout=0.1)).eval()
    randomise(ours, seed=3)
    export_hf_gpt2(ours, tmp_path)

    weights = load_file(tmp_path / "model.safetensors")
    assert "h.0.attn.c_attn.weight" in weights and not any(k.startswith("transformer.") for k in weights)
    assert weights["h.0.mlp.c_fc.weight"].shape == (64, 256)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert config["n_ctx"] == config["n_positions"] == 128 and config["eos_token_id"] == 50256

    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True,
                                                            attn_implementation="sdpa")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not info["error_msgs"]
    assert max_logit_difference(ours, hf.eval(), tokens(2, 32)) < TOLERANCE


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, context_length=64, n_layer=3, n_head=2, n_embd=32, dropout=0.1,
                       layer_norm_eps=1e-6)
    original = GPT(config)
    randomise(original, seed=4)
    loaded = import_hf_gpt2(export_hf_gpt2(original, tmp_path / "hf"))
    assert loaded.config == config
    assert "eos_token_id" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    state = loaded.state_dict()
    assert state.keys() == original.state_dict().keys()
    for name, tensor in original.state_dict().items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("flag", ["qkv_bias", "bias"])
def test_export_refuses_what_gpt2_cannot_express(flag, tmp_path):
    model = GPT(GPTConfig(vocab_size=100, context_length=16, n_layer=1, n_head=2, n_embd=16, **{flag: False}))
    with pytest.raises(ValueError, match=f"{flag}=False"):
        export_hf_gpt2(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_export_refuses_unmerged_lora(tmp_path):
    model = GPT(GPTConfig(vocab_size=100, context_length=16, n_layer=1, n_head=2, n_embd=16))
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="merge_lora"):
        export_hf_gpt2(model, tmp_path)


def test_wrong_shape_names_the_key(small_state):
    small_state["transformer.h.1.mlp.c_fc.weight"] = torch.zeros(64, 128)
    message = r"h\.1\.mlp\.c_fc\.weight: checkpoint shape \[64, 128\], the config needs \[64, 256\]"
    with pytest.raises(ValueError, match=message):
        import_hf_gpt2(small_state, {"n_head": 4})


def test_config_disagreeing_with_tensors_is_a_shape_error(small_state):
    with pytest.raises(ValueError, match=r"wpe\.weight: checkpoint shape \[128, 64\]"):
        import_hf_gpt2(small_state, {"n_head": 4, "n_positions": 256})


def test_missing_key_is_named(small_state):
    del small_state["transformer.h.1.ln_2.bias"]
    with pytest.raises(ValueError, match=r"missing key\(s\): h\.1\.ln_2\.bias"):
        import_hf_gpt2(small_state, {"n_head": 4})


def test_unexpected_key_is_named(small_state):
    small_state["score.weight"] = torch.zeros(2, 64)
    with pytest.raises(ValueError, match=r"unexpected key\(s\): score\.weight"):
        import_hf_gpt2(small_state, {"n_head": 4})


@pytest.fixture(scope="module")
def untied_hf():
    return hf_gpt2(**SMALL, tie_word_embeddings=False)


def test_untied_head_imports_and_exports_both_ways(untied_hf, tmp_path):
    state = untied_hf.state_dict()
    assert not torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    ours = import_hf_gpt2(state, {"n_head": 4})
    assert ours.config.tie_embeddings is False
    assert max_logit_difference(ours, untied_hf, tokens(2, 32)) < TOLERANCE

    export_hf_gpt2(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert max_logit_difference(ours, reloaded, tokens(2, 32)) < TOLERANCE
    assert import_hf_gpt2(tmp_path).config.tie_embeddings is False


def test_a_tied_config_ignores_a_stored_head_copy_as_transformers_does(small_hf, small_state):
    small_state["lm_head.weight"] = small_state["lm_head.weight"] + 1
    ours = import_hf_gpt2(small_state, {"n_head": 4, "tie_word_embeddings": True})
    assert ours.config.tie_embeddings is True
    assert max_logit_difference(ours, small_hf, tokens(2, 32)) < TOLERANCE


def test_n_head_is_required_for_a_bare_state_dict(small_state):
    with pytest.raises(ValueError, match="n_head"):
        import_hf_gpt2(small_state)


@pytest.mark.parametrize("field, value, message", [
    ("model_type", "gpt_neo", "model_type is 'gpt_neo'"),
    ("activation_function", "relu", "activation_function is 'relu'"),
    ("n_inner", 100, "n_inner is 100"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx"),
])
def test_non_gpt2_architectures_are_refused(small_hf, tmp_path, field, value, message):
    small_hf.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=message):
        import_hf_gpt2(tmp_path)


def test_pickle_only_directory_is_refused(small_state, tmp_path):
    torch.save(small_state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 4}))
    with pytest.raises(ValueError, match="only pytorch_model.bin: pickled checkpoints are not loaded"):
        import_hf_gpt2(tmp_path)


def test_pickle_named_safetensors_is_refused(small_state, tmp_path):
    torch.save(small_state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        import_hf_gpt2(tmp_path, {"n_head": 4})


def test_sharded_safetensors_directory(small_hf, small_state, tmp_path):
    names = sorted(small_state)
    shards = {"model-00001-of-00002.safetensors": names[:8], "model-00002-of-00002.safetensors": names[8:]}
    for shard, keys in shards.items():
        save_file({k: small_state[k].contiguous() for k in keys if k != "lm_head.weight"}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(small_hf.config.to_dict()))
    ours = import_hf_gpt2(tmp_path)
    assert max_logit_difference(ours, small_hf, tokens(1, 16)) < TOLERANCE


def test_parity_at_gpt2_124m_shape():
    hf = hf_gpt2()  # GPT2Config's defaults are the 124M gpt2 model
    ours = import_hf_gpt2(hf.state_dict(), hf.config.to_dict())
    assert ours.config == GPTConfig.preset("gpt2", dropout=0.1)
    assert ours.num_parameters() == 124_439_808
    assert max_logit_difference(ours, hf, tokens(2, 16)) < TOLERANCE


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"bias": False, "qkv_bias": False}])
def test_hf_shapes_are_those_of_the_model_it_describes(overrides):
    config = GPTConfig(vocab_size=100, context_length=16, n_layer=2, n_head=2, n_embd=16, **overrides)
    model = GPT(config)
    expected = {}
    for name, tensor in model.state_dict().items():
        hf = name.replace("blocks.", "h.", 1)
        transposed = hf.startswith("h.") and hf.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        expected[hf] = tuple(tensor.shape[::-1] if transposed else tensor.shape)
    assert hf_shapes(config) == expected


def refuse_to_build(monkeypatch):
    def no_model(*_args, **_kwargs):
        raise AssertionError("a GPT was built")

    monkeypatch.setattr(GPT, "__init__", no_model)


def test_more_layers_than_blocks_is_refused_before_a_model_is_built(small_hf, tmp_path, monkeypatch):
    small_hf.save_pretrained(tmp_path, safe_serialization=True)
    refuse_to_build(monkeypatch)
    with pytest.raises(ValueError, match="n_layer is 20000 but the weights hold 2 blocks"):
        import_hf_gpt2(tmp_path, {"n_layer": 20000})


def test_absurd_context_is_a_shape_error_naming_the_field(small_state, monkeypatch):
    refuse_to_build(monkeypatch)
    with pytest.raises(ValueError, match=r"wpe\.weight: .*the config needs \[1180591620717411303424, 64\] "
                                         r"\(from n_positions and n_embd\)"):
        import_hf_gpt2(small_state, {"n_head": 4, "n_positions": 2**70})


def test_integer_weights_are_refused(small_state, tmp_path):
    small_state["transformer.h.0.ln_1.bias"] = torch.zeros(64, dtype=torch.int32)
    save_file({k: v.contiguous() for k, v in small_state.items() if k != "lm_head.weight"},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"n_head": 4}))
    with pytest.raises(ValueError, match=r"h\.0\.ln_1\.bias: the tensor is not floating point"):
        import_hf_gpt2(tmp_path)
