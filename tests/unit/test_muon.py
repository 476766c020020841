from dataclasses import replace

import pytest
import torch
from torch import nn

from model import GPT, GPTConfig
from model.classifier import GPTClassifier, freeze_for_finetune
from model.lora import LoRAConfig, apply_lora
from model.muon import CombinedOptimizer, Muon, orthogonalize
from model.trainer import TrainConfig, make_optimizer

TINY = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
CPU = torch.device("cpu")
HIDDEN = {f"blocks.{i}.{name}.weight" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")}


def with_spectrum(rows: int, cols: int, singular_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A random [rows, cols] matrix with these singular values, and its polar factor U V^T."""
    u, _ = torch.linalg.qr(torch.randn(rows, len(singular_values)))
    v, _ = torch.linalg.qr(torch.randn(cols, len(singular_values)))
    return u @ torch.diag(singular_values) @ v.T, u @ v.T


@pytest.mark.parametrize("shape", [(128, 32), (32, 128)])
def test_newton_schulz_brings_singular_values_spread_over_two_decades_near_one(shape):
    torch.manual_seed(0)
    g, polar = with_spectrum(*shape, torch.logspace(0, -2, 32) * 1e-3)  # a gradient's scale does not matter
    o = orthogonalize(g)
    assert o.shape == g.shape and o.dtype == g.dtype
    singular_values = torch.linalg.svdvals(o)
    assert singular_values.min() > 0.65 and singular_values.max() < 1.25  # the quintic's band, not exactly 1
    assert torch.cosine_similarity(o.flatten(), polar.flatten(), dim=0) > 0.97


def test_a_first_step_moves_each_matrix_by_its_orthogonalized_gradient_scaled_for_its_shape():
    torch.manual_seed(0)
    tall, wide = nn.Parameter(torch.randn(64, 16)), nn.Parameter(torch.randn(16, 64))
    before = [tall.detach().clone(), wide.detach().clone()]
    tall.grad, wide.grad = torch.randn(64, 16), torch.randn(16, 64)
    Muon([tall, wide], lr=0.1).step()
    # the first Nesterov update is the gradient times a positive number, which orthogonalizing drops
    assert torch.allclose(before[0] - tall, 0.1 * 2 * orthogonalize(tall.grad), atol=1e-5)  # sqrt(64 / 16)
    assert torch.allclose(before[1] - wide, 0.1 * orthogonalize(wide.grad), atol=1e-5)


def test_muon_takes_matrices_only():
    with pytest.raises(ValueError, match="matrices only"):
        Muon([nn.Parameter(torch.zeros(3))])


def names(model: nn.Module, params) -> set[str]:
    lookup = {id(p): name for name, p in model.named_parameters()}
    return {lookup[id(p)] for p in params}


@pytest.mark.parametrize("layout", [dict(), dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True)])
def test_muon_trains_the_blocks_matrices_and_adamw_the_embeddings_head_and_vectors(layout):
    model = GPT(replace(TINY, tie_embeddings=False, **layout))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    muon, adamw = optimizer.optimizers
    assert isinstance(optimizer, CombinedOptimizer) and isinstance(muon, Muon)
    assert names(model, muon.param_groups[0]["params"]) == HIDDEN
    decayed, plain = adamw.param_groups
    embeddings = {"wte.weight", "wpe.weight", "lm_head.weight"} & dict(model.named_parameters()).keys()  # rope: no wpe
    assert names(model, decayed["params"]) == embeddings
    assert names(model, plain["params"]) == {name for name, p in model.named_parameters() if p.dim() == 1}
    assert muon.param_groups[0]["lr"] == 0.02 and decayed["lr"] == plain["lr"] == 6e-4


def test_frozen_parameters_are_in_neither_optimizer():
    model = GPTClassifier.from_lm(GPT(TINY), 2)
    freeze_for_finetune(model, trainable_blocks=1)
    muon, adamw = make_optimizer(model, TrainConfig(optimizer="muon"), CPU).optimizers
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names(model, muon.param_groups[0]["params"]) == {f"gpt.{name}" for name in HIDDEN if "blocks.1" in name}
    assert names(model, [p for group in adamw.param_groups for p in group["params"]]) == \
        trained - {f"gpt.{name}" for name in HIDDEN}
    assert {"head.weight", "head.bias"} <= trained


def test_lora_adapters_train_with_adamw_alone():
    model = GPT(TINY)
    apply_lora(model, LoRAConfig(rank=4))
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), CPU)
    assert isinstance(optimizer, torch.optim.AdamW)  # no trainable hidden matrix is left for Muon
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert names(model, params) == {name for name, p in model.named_parameters() if p.requires_grad}
    assert params and all(".lora_" in name for name in names(model, params))


def repeated_pattern_losses(kind: str, steps: int) -> list[float]:
    """Train TINY at the optimizer's default learning rates on windows of a repeated random 24-token pattern."""
    generator = torch.Generator().manual_seed(0)
    stream = torch.randint(0, TINY.vocab_size, (24,), generator=generator).repeat(64)
    torch.manual_seed(0)
    model = GPT(TINY)
    optimizer = make_optimizer(model, TrainConfig(optimizer=kind), CPU)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 17, (8,), generator=generator)
        windows = torch.stack([stream[start:start + 17] for start in starts])
        _, loss = model(windows[:, :-1], windows[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_muon_learns_a_repeated_pattern_at_least_as_well_as_adamw():
    muon, adamw = repeated_pattern_losses("muon", 200), repeated_pattern_losses("adamw", 200)
    final_muon, final_adamw = sum(muon[-10:]) / 10, sum(adamw[-10:]) / 10
    assert final_muon < muon[0] / 3
    assert final_muon < final_adamw * 1.1
