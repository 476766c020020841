"""Hugging Face Llama and Qwen3 checkpoints in and out, checked against transformers' own models."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import GPT, GPTConfig, LoRAConfig, apply_lora
from model.generate import Decoder
from model.hf_llama import export_hf_llama, import_hf_llama
from tests.unit.test_llama import LLAMA_TINY, QWEN3_TINY, VOCAB, random_model

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
CONFIGS = {"llama": LLAMA_TINY, "qwen3": QWEN3_TINY,
           "llama-mqa-theta-tied": replace(LLAMA_TINY, rope_theta=500000.0, n_kv_head=1, tie_embeddings=True),
           # scaled rotations, with an original context short enough that the 40 test positions feel them
           "llama-rope-linear": replace(LLAMA_TINY, rope_scaling={"rope_type": "linear", "factor": 4.0}),
           "llama-rope-llama3": replace(LLAMA_TINY, rope_scaling={
               "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}),
           "qwen3-rope-yarn": replace(QWEN3_TINY, rope_scaling={
               "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})}


def hf_model(config: GPTConfig):
    """transformers' Llama or (qk_norm) Qwen3 of config's shape, random (norm gains too), in eval mode."""
    shape = dict(vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=config.mlp_width,
                 num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
                 num_key_value_heads=config.kv_heads, head_dim=config.head_dim,
                 max_position_embeddings=config.context_length, rms_norm_eps=config.layer_norm_eps,
                 tie_word_embeddings=config.tie_embeddings,
                 rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta, **{
                     k: v for k, v in (config.rope_scaling or {}).items() if v is not None}})
    kind = "Qwen3" if config.qk_norm else "Llama"
    torch.manual_seed(6)
    model = getattr(transformers, f"{kind}ForCausalLM")(getattr(transformers, f"{kind}Config")(**shape))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model.eval()


def imported(config: GPTConfig) -> GPTConfig:
    """config as an import reads it: config.json spells out the MLP's width."""
    return replace(config, mlp_hidden=config.mlp_width)


def tokens(batch: int = 2, length: int = 40) -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randint(0, VOCAB, (batch, length))


@pytest.mark.parametrize("name", CONFIGS)
@torch.inference_mode()
def test_import_gives_transformers_logits(name, tmp_path):
    theirs = hf_model(CONFIGS[name])
    theirs.save_pretrained(tmp_path)
    ours = import_hf_llama(tmp_path)
    assert ours.config == imported(CONFIGS[name])
    idx = tokens()
    expected = theirs(idx).logits
    assert torch.allclose(ours(idx)[0], expected, atol=TOLERANCE)
    decoder = Decoder(ours, 2)
    decoder.logits(idx[:, :30])
    assert torch.allclose(decoder.logits(idx[:, 30:31]), expected[:, 30], atol=TOLERANCE)


@pytest.mark.parametrize("name", CONFIGS)
@torch.inference_mode()
def test_export_loads_in_transformers_with_the_same_logits(name, tmp_path):
    ours = random_model(CONFIGS[name])
    export_hf_llama(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    kind = "Qwen3" if ours.config.qk_norm else "Llama"
    assert config["architectures"] == [f"{kind}ForCausalLM"] and config["num_key_value_heads"] == ours.config.kv_heads
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(theirs).__name__ == f"{kind}ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    idx = tokens()
    assert torch.allclose(theirs.eval()(idx).logits, ours(idx)[0], atol=TOLERANCE)


def test_round_trip_is_exact(tmp_path):
    original = random_model(QWEN3_TINY)
    loaded = import_hf_llama(export_hf_llama(original, tmp_path))
    assert loaded.config == imported(original.config)
    assert "lm_head.weight" in load_file(tmp_path / "model.safetensors")
    for name, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_export_refuses_what_llama_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="position='learned', norm='layernorm', mlp='gelu', qkv_bias=True, bias=True"):
        export_hf_llama(GPT(GPTConfig.preset("nano", vocab_size=VOCAB)), tmp_path)
    adapted = GPT(LLAMA_TINY)
    apply_lora(adapted, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match="merge_lora"):
        export_hf_llama(adapted, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.fixture
def exported(tmp_path):
    export_hf_llama(random_model(LLAMA_TINY), tmp_path)
    return tmp_path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="gpt2"), "model_type is 'gpt2'"),
    (dict(hidden_act="gelu"), "hidden_act is 'gelu'"),
    (dict(attention_bias=True), "attention_bias is set"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     "rope_type 'llama3' needs low_freq_factor"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0}), "'longrope'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
                           "original_max_position_embeddings": 16, "mscale": 0.7}), "not mscale"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": -2}), "factor must be a positive"),
    (dict(rope_parameters=[1, 2]), "rope_parameters must be an object"),
    (dict(head_dim=32), "head_dim is 32"),
    (dict(num_key_value_heads=4), r"self_attn\.k_proj\.weight: checkpoint shape \[32, 64\], the config needs "
                                  r"\[64, 64\]"),
])
def test_import_refuses_what_our_gpt_does_not_compute(exported, changes, message):
    edit_config(exported, **changes)
    with pytest.raises(ValueError, match=message):
        import_hf_llama(exported)


def test_import_reads_older_configs_and_ignores_saved_rotary_buffers(exported):
    config = json.loads((exported / "config.json").read_text())
    del config["rope_parameters"]  # transformers 4 wrote rope_theta alone
    (exported / "config.json").write_text(json.dumps({**config, "rope_theta": 500000.0}))
    state = load_file(exported / "model.safetensors")
    save_file({**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}, exported / "model.safetensors")
    assert import_hf_llama(exported).config.rope_theta == 500000.0
    save_file({**state, "model.layers.0.mlp.extra.weight": torch.ones(8)}, exported / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected key"):
        import_hf_llama(exported)
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, exported / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing key\(s\): model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf_llama(exported)
