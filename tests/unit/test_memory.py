import pytest
import torch

from model import GPT, GPTClassifier, GPTConfig, LoRAConfig, apply_lora, freeze_for_finetune
from model.memory import (
    activation_bytes,
    finetune_bytes,
    human_bytes,
    kv_cache_bytes,
    num_parameters,
    serving_bytes,
    training_bytes,
    weight_bytes,
)

CONFIGS = [
    dict(),
    dict(tie_embeddings=False),
    dict(bias=False),
    dict(qkv_bias=False, bias=False, tie_embeddings=False),
    dict(n_layer=3, n_head=2, n_embd=32, context_length=40),
    dict(position="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, bias=False, tie_embeddings=False,
         n_kv_head=2),  # llama-nano
    dict(norm="rmsnorm", mlp="swiglu", mlp_hidden=100, n_kv_head=1, qk_norm=True),  # with biases and a tied head
]


@pytest.mark.parametrize("overrides", CONFIGS)
def test_parameter_count_equals_the_built_models(overrides):
    config = GPTConfig.preset("nano", vocab_size=300, **overrides)
    assert num_parameters(config) == GPT(config).num_parameters()
    assert weight_bytes(config) == 4 * num_parameters(config)


def test_gpt2_has_124m_parameters_without_being_built():
    assert num_parameters(GPTConfig.preset("gpt2")) == 124_439_808


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_estimate_equals_a_real_caches_bytes(dtype):
    config = GPTConfig(vocab_size=50, context_length=24, n_layer=3, n_head=2, n_embd=16)
    model = GPT(config).to(dtype)
    cache = model.new_cache(5)
    real = cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size()
    assert kv_cache_bytes(config, 5, dtype_bytes=torch.finfo(dtype).bits // 8) == real
    assert kv_cache_bytes(config, 5, context=12) == 2 * 3 * 5 * 2 * 12 * 8 * 4


def test_grouped_query_attention_caches_its_key_value_heads_alone():
    config = GPTConfig(vocab_size=50, context_length=24, n_layer=3, n_head=4, n_embd=32, n_kv_head=1)
    cache = GPT(config).new_cache(5)
    assert kv_cache_bytes(config, 5) == 2 * cache.k.numel() * 4 == 2 * 3 * 5 * 1 * 24 * 8 * 4


def test_training_and_serving_estimates_add_their_parts():
    config = GPTConfig.preset("nano", vocab_size=300)
    activations = activation_bytes(config, batch_size=4, context=64)
    assert activations > activation_bytes(config, batch_size=2, context=64) > 0
    assert training_bytes(config, 4, 64) == 16 * num_parameters(config) + activations
    assert serving_bytes(config, 8) == 2 * weight_bytes(config) + kv_cache_bytes(config, 8)
    assert serving_bytes(config, 1) == weight_bytes(config) + kv_cache_bytes(config, 1)


def parameters_and_trainable(model) -> int:
    """What finetune_bytes counts with one byte per value and no activations: weights + 3 x trainable."""
    return sum(p.numel() * (1 + 3 * p.requires_grad) for p in model.parameters())


@pytest.mark.parametrize("overrides", CONFIGS)
@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=4), LoRAConfig(rank=2, targets=("c_proj",))])
def test_finetune_estimates_count_the_trainable_parameters_of_the_built_models(overrides, lora):
    config = GPTConfig.preset("nano", vocab_size=300, **overrides)
    instruct = GPT(config)
    if lora is not None:
        apply_lora(instruct, lora)
    assert finetune_bytes(config, 0, 16, lora=lora, dtype_bytes=1) == parameters_and_trainable(instruct)
    for blocks in (0, 2):
        classifier = GPTClassifier.from_lm(GPT(config), 3)
        if lora is not None:
            apply_lora(classifier, lora, trainable=(classifier.head,))
        else:
            freeze_for_finetune(classifier, blocks)
        estimate = finetune_bytes(config, 0, 16, n_classes=3, trainable_blocks=blocks, lora=lora, dtype_bytes=1)
        assert estimate == parameters_and_trainable(classifier)


def test_human_bytes():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(16 * 1024**3) == "16.0 GiB"
    assert human_bytes(3 * 1024**5) == "3.0 PiB"
