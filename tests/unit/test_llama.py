"""The Llama / Qwen3 options of GPTConfig: rotary positions, RMSNorm, SwiGLU, grouped-query attention, qk_norm."""

import copy
import threading
from dataclasses import replace

import pytest
import torch

from model import (
    GPT,
    AdapterSet,
    ConfigError,
    GPTClassifier,
    GPTConfig,
    LoRAConfig,
    SamplingParams,
    apply_lora,
    export_hf_gpt2,
    generate,
    gpt2_tokenizer,
    load_checkpoint,
    merge_lora,
    save_checkpoint,
)
from model.config import LLAMA, PRESETS
from model.generate import Decoder
from model.memory import kv_cache_bytes, lora_parameters, num_parameters
from model.norm import RMSNorm
from model.rope import apply_rotation, rotation
from serving.engine import Engine, Request
from tests.helpers import random_adapter

VOCAB = 300
LLAMA_TINY = GPTConfig.preset("llama-nano", vocab_size=VOCAB, context_length=48)  # 2 layers, 64 wide, 4/2 heads
QWEN3_TINY = replace(LLAMA_TINY, qk_norm=True)
# each option on its own over GPT-2, and the two families
CONFIGS = {
    "llama": LLAMA_TINY,
    "qwen3": QWEN3_TINY,
    "rope": GPTConfig.preset("nano", vocab_size=VOCAB, context_length=48, position="rope"),
    "rmsnorm": GPTConfig.preset("nano", vocab_size=VOCAB, context_length=48, norm="rmsnorm"),
    "swiglu": GPTConfig.preset("nano", vocab_size=VOCAB, context_length=48, mlp="swiglu", mlp_hidden=100),
    "mqa": GPTConfig.preset("nano", vocab_size=VOCAB, context_length=48, n_kv_head=1),
    "qk_norm": GPTConfig.preset("nano", vocab_size=VOCAB, context_length=48, qk_norm=True),
}


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    """A model with weights far enough from the init (norm gains too) that a wrong detail changes the logits and
    greedy choices are no near-ties."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1 and name.endswith("weight"):  # norm gains
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.1 if param.dim() == 2 else 0.02)
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return random_model(CONFIGS[request.param])


def test_old_config_dicts_load_as_gpt2_and_keep_their_weights():
    old = dict(vocab_size=VOCAB, context_length=48, n_layer=2, n_head=4, n_embd=64, dropout=0.0, qkv_bias=True,
               bias=True, layer_norm_eps=1e-5, tie_embeddings=True)  # a config.json written before these options
    config = GPTConfig.from_dict(old)
    assert config == GPTConfig.preset("nano", vocab_size=VOCAB, context_length=48)
    assert (config.position, config.norm, config.mlp, config.kv_heads, config.mlp_width, config.qk_norm) == (
        "learned", "layernorm", "gelu", 4, 256, False)
    assert GPTConfig.from_dict(config.to_dict()) == config
    names = set(GPT(config).state_dict())
    assert "wpe.weight" in names and not any("norm" in name for name in names)


def test_presets_have_the_small_presets_sizes():
    for size in ("nano", "mini", "small"):
        gpt2 = GPTConfig.preset(size)
        for family in ("llama", "qwen3"):
            config = GPTConfig.preset(f"{family}-{size}")
            assert (config.n_layer, config.n_head, config.n_embd, config.context_length) == (
                gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.context_length)
            assert (config.position, config.norm, config.mlp) == ("rope", "rmsnorm", "swiglu")
            assert not (config.bias or config.qkv_bias or config.tie_embeddings)
            assert config.kv_heads == config.n_head // 2 and config.qk_norm == (family == "qwen3")
    assert [GPTConfig.preset(f"llama-{s}").mlp_width for s in ("nano", "mini", "small")] == [192, 384, 1024]
    assert GPTConfig.preset("llama-nano", mlp_hidden=100).mlp_width == 100
    assert GPTConfig.preset("llama-nano", rope_theta=500000).rope_theta == 500000.0
    assert all(set(PRESETS[f"llama-{s}"]) >= set(LLAMA) for s in ("nano", "mini", "small"))


@pytest.mark.parametrize("values, message", [
    (dict(n_kv_head=3), r"n_kv_head \(3\) must divide n_head \(4\)"),
    (dict(n_kv_head=0), "n_kv_head must be a positive integer"),
    (dict(norm="batchnorm"), "norm must be one of 'layernorm', 'rmsnorm'"),
    (dict(mlp="relu"), "mlp must be one of"),
    (dict(position="alibi"), "position must be one of"),
    (dict(position="rope", n_embd=36, n_head=4), r"head_dim \(n_embd / n_head = 9\) must be even"),
    (dict(rope_theta=0), "rope_theta must be a positive number"),
    (dict(rope_theta="big"), "rope_theta must be a positive number"),
    (dict(mlp_hidden=0), "mlp_hidden must be a positive integer"),
    (dict(qk_norm="yes"), "qk_norm must be true or false"),
])
def test_invalid_options_name_their_field(values, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig.preset("nano", **values)


def test_llama_layers_have_the_grouped_and_gated_shapes():
    model = GPT(QWEN3_TINY)
    block = model.blocks[0]
    assert model.wpe is None and model.lm_head is not None
    assert block.attn.c_attn.weight.shape == (64 + 2 * 2 * 16, 64)  # q for 4 heads, k and v for 2
    assert block.mlp.c_fc.weight.shape == (2 * 192, 64) and block.mlp.c_proj.weight.shape == (64, 192)
    assert isinstance(block.ln_1, RMSNorm) and isinstance(model.ln_f, RMSNorm)
    assert block.attn.q_norm.weight.shape == (16,)
    assert not any(name.endswith("bias") for name in model.state_dict())
    cache = model.new_cache(3)
    assert cache.k.shape == (2, 3, 2, 48, 16)  # n_kv_head heads: half the memory of one per query head
    assert kv_cache_bytes(QWEN3_TINY, 3) == 2 * cache.k.numel() * 4
    assert kv_cache_bytes(QWEN3_TINY, 3) * 2 == kv_cache_bytes(replace(QWEN3_TINY, n_kv_head=None), 3)


@pytest.mark.parametrize("name", CONFIGS)
def test_parameter_estimates_count_the_built_models(name):
    config = CONFIGS[name]
    model = GPT(config)
    assert num_parameters(config) == sum(p.numel() for p in model.parameters())
    lora = LoRAConfig(rank=2)
    assert apply_lora(model, lora) == lora_parameters(config, lora)


def test_rope_rotates_pairs_of_halves_as_complex_numbers():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)  # [B, H, T, D]
    positions = torch.tensor([0, 1, 4, 9, 30])
    cos, sin = rotation(positions, 8, 10000.0, torch.float32)
    # dimension i and i + D/2 are the real and imaginary parts of a number turned by position * theta^(-2i/D)
    frequencies = 10000.0 ** (-torch.arange(4) * 2 / 8)
    turn = torch.polar(torch.ones(5, 4), positions[:, None].float() * frequencies)
    expected = torch.view_as_complex(torch.stack(x.chunk(2, dim=-1), dim=-1).contiguous()) * turn
    assert torch.allclose(apply_rotation(x, cos, sin), torch.cat([expected.real, expected.imag], dim=-1), atol=1e-5)


def test_rope_scores_depend_on_relative_positions_alone():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(m: int, n: int) -> float:
        return float(apply_rotation(q, *rotation(torch.tensor([m]), 16, 10000.0, torch.float32))
                     @ apply_rotation(k, *rotation(torch.tensor([n]), 16, 10000.0, torch.float32)).mT)

    assert score(7, 3) == pytest.approx(score(27, 23), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(12, 3), abs=1e-2)  # the distance does matter


@torch.inference_mode()
def test_shifting_every_position_leaves_the_logits_unchanged(model):
    """With rope and no position table, a sequence placed at positions s..s+T-1 attends exactly as at 0..T-1."""
    idx = torch.randint(0, VOCAB, (2, 9))

    def hidden(shift: int) -> torch.Tensor:
        x = model.wte(idx)
        rope = rotation(torch.arange(shift, shift + 9), model.config.head_dim, model.config.rope_theta, x.dtype)
        for block in model.blocks:
            x = block(x, rope=rope)
        return model.ln_f(x)

    assert torch.allclose(hidden(0), model.hidden_states(idx), atol=1e-6)
    assert torch.allclose(hidden(25), hidden(0), atol=1e-4)


@pytest.mark.parametrize("name", CONFIGS)
@torch.inference_mode()
def test_cached_decoding_equals_the_uncached_forward(name):
    model = random_model(CONFIGS[name])
    torch.manual_seed(1)
    idx = torch.randint(0, VOCAB, (2, 14))
    full = model(idx)[0]  # [B, T, V]
    decoder = Decoder(model, 2)
    assert torch.allclose(decoder.logits_of_each(idx[:, :9]), full[:, :9], atol=1e-5)
    for t in range(9, 14):
        assert torch.allclose(decoder.logits(idx[:, t: t + 1]), full[:, t], atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
@torch.inference_mode()
def test_ragged_prefill_and_rows_at_different_positions_decode_as_if_alone(name):
    model = random_model(CONFIGS[name])
    torch.manual_seed(2)
    sequences = [torch.randint(0, VOCAB, (n,)).tolist() for n in (16, 19, 13)]
    prompts = [s[:n] for s, n in zip(sequences, (3, 11, 7), strict=True)]
    decoder = Decoder(model, 4)
    slots = torch.tensor([3, 0, 2])  # out of order: each row reads its own slot's length
    logits = decoder.prefill_ragged(prompts, slots)
    for row, prompt in enumerate(prompts):
        assert torch.allclose(logits[row], model(torch.tensor([prompt]))[0][0, -1], atol=1e-5)
    for step in range(5):
        tokens = torch.tensor([[s[len(p) + step]] for s, p in zip(sequences, prompts, strict=True)])
        logits = decoder.logits(tokens, slots)  # rows at positions 3, 11 and 7 (+ step)
        for row, (sequence, prompt) in enumerate(zip(sequences, prompts, strict=True)):
            alone = model(torch.tensor([sequence[: len(prompt) + step + 1]]))[0][0, -1]
            assert torch.allclose(logits[row], alone, atol=1e-5)


@torch.inference_mode()
def test_a_copied_prefix_continues_like_its_source(model):
    torch.manual_seed(3)
    prompt = torch.randint(0, VOCAB, (1, 10))
    decoder = Decoder(model, 2)
    decoder.logits(prompt, torch.tensor([0]))
    decoder.cache.copy_prefix(0, 1, 10)
    nexts = torch.tensor([[5], [77]])
    logits = decoder.logits(nexts, torch.tensor([0, 1]))
    for row in range(2):
        alone = model(torch.cat([prompt, nexts[row: row + 1]], dim=1))[0][0, -1]
        assert torch.allclose(logits[row], alone, atol=1e-5)


def test_engine_greedy_output_equals_generate(model):
    torch.manual_seed(4)
    prompts = [torch.randint(0, VOCAB, (n,)).tolist() for n in (3, 12, 7, 1)]
    served = copy.deepcopy(model)
    engine = Engine(served, gpt2_tokenizer(), max_batch=3, max_queue=8).start()
    try:
        outputs = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]

        def collector(i):
            def on_event(event):
                assert not isinstance(event, Exception), event
                outputs[i].append(event.token_id)
                if event.finish_reason is not None:
                    done[i].set()
            return on_event

        for i, prompt in enumerate(prompts):
            engine.submit(Request(prompt, 10, SamplingParams(), collector(i)))
        assert all(event.wait(60) for event in done)
    finally:
        engine.stop()
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output == generate(model, torch.tensor([prompt]), 10)[0, len(prompt):].tolist()


def test_lora_adapts_the_attention_and_the_gated_mlp_and_merges_exactly(model):
    adapted = copy.deepcopy(model)
    idx = torch.randint(0, VOCAB, (2, 10))
    apply_lora(adapted, LoRAConfig(rank=4, alpha=8))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if name.endswith("lora_b"):
                param.normal_(0, 0.1)
        before = adapted(idx)[0]
        assert not torch.allclose(before, model(idx)[0], atol=1e-3)
        merge_lora(adapted)
        assert torch.allclose(adapted(idx)[0], before, atol=1e-5)
    assert set(adapted.state_dict()) == set(model.state_dict())


@torch.inference_mode()
def test_adapter_set_rows_equal_their_merged_models(model):
    merged = {}
    served = copy.deepcopy(model)
    adapter_set = AdapterSet(served)
    assert len(adapter_set.layers) == 4 * model.config.n_layer  # c_attn, c_proj, c_fc, the MLP's c_proj
    for seed, (name, lora) in enumerate({"a": LoRAConfig(rank=2), "b": LoRAConfig(rank=4, targets=("c_fc",))}.items()):
        adapter, merged[name] = random_adapter(model, lora, seed)
        adapter_set.add(name, adapter)
    idx = torch.randint(0, VOCAB, (3, 8))
    names = ["b", None, "a"]
    with adapter_set.rows(names):
        logits = served(idx)[0]
    for row, name in enumerate(names):
        alone = (model if name is None else merged[name])(idx[row: row + 1])[0][0]
        torch.testing.assert_close(logits[row], alone, atol=1e-5, rtol=0)


def test_classifier_from_a_llama_reads_its_hidden_states(model):
    classifier = GPTClassifier.from_lm(model, 3).eval()
    idx = torch.randint(0, VOCAB, (2, 6))
    assert classifier.gpt.lm_head is None  # the untied head is dropped with the LM
    with torch.no_grad():
        assert torch.equal(classifier.gpt.hidden_states(idx), model.hidden_states(idx))
    logits, loss = classifier(idx, torch.tensor([6, 4]), torch.tensor([0, 2]))
    assert logits.shape == (2, 3) and loss.item() > 0


def test_checkpoint_round_trip(model, tmp_path):
    save_checkpoint(tmp_path / "llama", model, gpt2_tokenizer())
    loaded, _, meta = load_checkpoint(tmp_path / "llama")
    assert loaded.config == model.config and meta["model"]["n_kv_head"] == 2
    idx = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_a_few_adamw_steps_reduce_the_loss():
    torch.manual_seed(5)
    model = GPT(QWEN3_TINY).train()
    idx = torch.randint(0, VOCAB, (4, 24))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_the_gpt2_exporter_refuses_what_gpt2_cannot_express(model, tmp_path):
    with pytest.raises(ValueError, match="qkv_bias=False"):
        export_hf_gpt2(model, tmp_path / "out")
    with pytest.raises(ValueError, match="position='rope', norm='rmsnorm', mlp='swiglu', mlp_hidden=192, "
                                         "n_kv_head=2"):
        export_hf_gpt2(GPT(replace(model.config, qkv_bias=True, bias=True)), tmp_path / "out")
    with pytest.raises(ValueError, match="qk_norm=True"):
        export_hf_gpt2(GPT(CONFIGS["qk_norm"]), tmp_path / "out")
    assert not (tmp_path / "out").exists()
