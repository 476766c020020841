import math

import pytest
import torch
import torch.nn.functional as F

import model.linear as linear_module
from model import GPT, ConfigError, GPTConfig
from model.classifier import GPTClassifier, freeze_for_finetune
from model.linear import FEW_ROWS, Linear, linear
from model.lora import LoRAConfig, apply_lora, has_lora, merge_lora
from model.loss import cross_entropy

TINY = dict(vocab_size=300, context_length=32, n_layer=2, n_head=4, n_embd=32)


def test_presets_have_the_documented_sizes():
    gpt2 = GPTConfig.preset("gpt2")
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.vocab_size, gpt2.context_length) == (
        12, 12, 768, 50257, 1024)
    small = GPTConfig.preset("small")
    assert (small.n_layer, small.n_head, small.n_embd) == (6, 6, 384)
    nano = GPTConfig.preset("nano")
    assert (nano.n_layer, nano.n_embd) == (2, 64)
    for name in ("gpt2-medium", "gpt2-large", "gpt2-xl", "mini"):
        assert GPTConfig.preset(name).n_embd % GPTConfig.preset(name).n_head == 0
    assert GPTConfig.preset("small", context_length=64).context_length == 64


def test_gpt2_preset_has_124m_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    assert model.num_parameters() == 124_439_808


@pytest.mark.parametrize("values, message", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_layer=0), "n_layer must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size must be a positive integer"),
    (dict(context_length=2.5), "context_length must be a positive integer"),
    (dict(dropout=1.0), "dropout"),
])
def test_invalid_configs_say_what_is_wrong(values, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**{**TINY, **values})


def test_unknown_preset_and_fields_are_rejected():
    with pytest.raises(ConfigError, match="unknown preset"):
        GPTConfig.preset("gpt5")
    with pytest.raises(ConfigError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({**TINY, "n_heads": 4})


def test_forward_shapes_loss_and_tied_head():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    idx = torch.randint(0, 300, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 300) and loss is None
    _, loss = model(idx, torch.randint(0, 300, (3, 10)))
    assert math.isclose(loss.item(), math.log(300), rel_tol=0.05)  # an untrained model is near uniform
    assert "lm_head.weight" not in model.state_dict()  # the head is the token embedding
    targets = idx.clone()
    targets[:, 5:] = -100
    _, partial = model(idx, targets)
    full_logits = model(idx[:, :5])[0]  # causal: the first five positions do not see the rest
    expected = torch.nn.functional.cross_entropy(full_logits.reshape(-1, 300), idx[:, :5].reshape(-1))
    assert torch.allclose(partial, expected, atol=1e-5)


def test_untied_head_is_a_separate_output_layer():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, tie_embeddings=False))
    assert model.lm_head.weight.shape == (300, 32)
    assert model.num_parameters() == GPT(GPTConfig(**TINY)).num_parameters() + 300 * 32
    idx = torch.randint(0, 300, (2, 7))
    logits, _ = model(idx)
    assert torch.allclose(logits, model.hidden_states(idx) @ model.lm_head.weight.t(), atol=1e-6)
    assert not torch.allclose(logits, model.hidden_states(idx) @ model.wte.weight.t(), atol=1e-3)

    classifier = GPTClassifier.from_lm(model, 2)  # a classifier reads hidden states: no LM head to keep
    assert classifier.gpt.lm_head is None and classifier.config.tie_embeddings
    assert torch.equal(classifier.gpt.hidden_states(idx), model.hidden_states(idx))


def test_residual_projections_get_the_scaled_init():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=300, context_length=32, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    std = model.blocks[0].attn.c_proj.weight.std().item()
    assert math.isclose(std, 0.02 / math.sqrt(2 * 8), rel_tol=0.1)
    assert math.isclose(model.blocks[0].mlp.c_fc.weight.std().item(), 0.02, rel_tol=0.1)


def test_too_long_input_is_an_error():
    model = GPT(GPTConfig(**TINY))
    with pytest.raises(ValueError, match="exceeds the context length"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 48), (5, 1, 48), (3, 7, 48)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_row_blocks_equals_f_linear(threads, shape, bias):
    torch.manual_seed(0)
    layer = Linear(48, 100, bias=bias)  # 100 rows: 3 threads leave one row over
    x = torch.randn(shape)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            blocked = linear(x, layer.weight, layer.bias)
    finally:
        torch.set_num_threads(previous)
    assert blocked.shape == (*shape[:-1], 100) and blocked.is_contiguous()
    assert torch.allclose(blocked, F.linear(x, layer.weight, layer.bias), atol=1e-5)


def test_linear_uses_row_blocks_only_for_few_rows_in_inference(monkeypatch):
    calls = []
    real = linear_module.row_block_matmul
    monkeypatch.setattr(linear_module, "row_block_matmul", lambda w, c, b: calls.append(c.shape) or real(w, c, b))
    layer = Linear(16, 32)
    layer(torch.randn(2, 16))  # grad enabled: training keeps F.linear and its backward
    with torch.inference_mode():
        layer(torch.randn(2, 3, 16))
        layer(torch.randn(FEW_ROWS + 1, 16))
    assert calls == [(16, 6)]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")
def test_packed_weights_give_the_same_logits_and_are_dropped_once_the_weights_change(monkeypatch):
    calls = []
    real = linear_module.packed_linear
    monkeypatch.setattr(linear_module, "packed_linear", lambda x, p, b: calls.append(x.shape) or real(x, p, b))
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 300, (3, 5))
    with torch.inference_mode():
        before = model(idx)[0]
    assert not calls
    model.pack_for_batches()
    assert all(m.packed is not None for m in model.modules() if isinstance(m, Linear))
    with torch.inference_mode():
        assert torch.allclose(model(idx)[0], before, atol=1e-5)
        one_row = model(idx[:1, :1])[0]  # a single row keeps the row blocks
    assert len(calls) == 4 * TINY["n_layer"] and one_row.shape == (1, 1, 300)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(idx, idx)[1].backward()
    optimizer.step()  # the weights change in place: every packed copy is now stale
    calls.clear()
    with torch.inference_mode():
        after = model(idx)[0]
    assert not calls
    assert torch.allclose(after, model(idx)[0].detach(), atol=1e-5) and not torch.allclose(after, before, atol=1e-3)
    model.load_state_dict(GPT(GPTConfig(**TINY)).state_dict())  # so do loaded weights
    with torch.inference_mode():
        model(idx)
    assert not calls


def test_classifier_reads_the_last_real_token_not_the_padding():
    torch.manual_seed(0)
    model = GPTClassifier(GPTConfig(**TINY), n_classes=3).eval()
    text = torch.randint(0, 300, (1, 6))
    padded = torch.cat([text, torch.full((1, 4), 7)], dim=1)
    alone = model(text)[0]
    assert torch.allclose(model(padded, torch.tensor([6]))[0], alone, atol=1e-5)
    assert not torch.allclose(model(padded)[0], alone, atol=1e-3)  # position -1 is padding
    probs = model.predict_proba(padded, torch.tensor([6]))
    assert probs.shape == (1, 3) and torch.allclose(probs.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="length"):
        model(padded, torch.tensor([0]))


def test_freeze_for_finetune_trains_last_blocks_norm_and_head():
    model = GPTClassifier(GPTConfig(**TINY), n_classes=2)
    n = freeze_for_finetune(model, trainable_blocks=1)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.startswith(("gpt.blocks.1.", "gpt.ln_f.", "head.")) for name in trainable)
    assert "head.weight" in trainable and "gpt.ln_f.weight" in trainable
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="trainable_blocks"):
        freeze_for_finetune(model, trainable_blocks=3)


def test_lora_starts_as_a_no_op_trains_only_adapters_and_merges_exactly():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY)).eval()
    idx = torch.randint(0, 300, (2, 10))
    before = model(idx)[0]
    n_trainable = apply_lora(model, LoRAConfig(rank=4, alpha=8))
    assert has_lora(model)
    assert torch.allclose(model(idx)[0], before)  # B starts at zero
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    # 2 blocks x (c_attn 32->96, attn.c_proj 32->32, c_fc 32->128, mlp.c_proj 128->32), rank 4
    assert n_trainable == 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_()
    adapted = model(idx)[0]
    assert not torch.allclose(adapted, before)
    merge_lora(model)
    assert not has_lora(model)
    assert torch.allclose(model(idx)[0], adapted, atol=1e-4)
    assert set(model.state_dict()) == set(GPT(GPTConfig(**TINY)).state_dict())


def test_lora_config_is_validated():
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="alpha"):
        LoRAConfig(alpha=0)
    with pytest.raises(ValueError, match="no linear layer"):
        apply_lora(GPT(GPTConfig(**TINY)), LoRAConfig(targets=("nothing",)))


def test_cross_entropy_matches_torch_in_value_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(12, 300)
    targets = torch.randint(0, 300, (12,))
    targets[[2, 7]] = -100
    ours_in = logits.clone().requires_grad_()
    torch_in = logits.clone().requires_grad_()
    ours = cross_entropy(ours_in, targets)
    reference = torch.nn.functional.cross_entropy(torch_in, targets, ignore_index=-100)
    (ours * 3).backward()
    (reference * 3).backward()
    assert torch.allclose(ours, reference, atol=1e-5)
    assert torch.allclose(ours_in.grad, torch_in.grad, atol=1e-6)
    assert cross_entropy(logits, torch.full((12,), -100)).item() == 0.0


def test_public_api_is_importable_from_model():
    import model

    for name in ("GPTConfig", "GPT", "generate", "stream_generate", "generate_batch", "load_checkpoint",
                 "save_checkpoint", "import_hf_gpt2", "export_hf_gpt2", "import_hf_llama", "export_hf_llama",
                 "Trainer", "TrainConfig",
                 "GPTClassifier", "LoRAConfig", "apply_lora", "merge_lora", "gpt2_tokenizer", "train_bpe",
                 "score_tokens", "classify", "classification_report", "generate_responses", "response_loss"):
        assert name in model.__all__ and getattr(model, name) is not None, name
