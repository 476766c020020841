import copy
from dataclasses import replace

import pytest
import torch

from model import GPT
from model.lora import LoRAConfig, apply_lora
from model.multi_lora import AdapterSet, MultiLoRALinear, adapter_bytes
from tests.helpers import TINY_LM as CONFIG
from tests.helpers import random_adapter

LORAS = {"a": LoRAConfig(rank=2, alpha=4), "b": LoRAConfig(rank=4, alpha=2, targets=("c_attn", "c_fc"))}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


@pytest.fixture(scope="module")
def adapters(base):
    return {name: random_adapter(base, lora, seed) for seed, (name, lora) in enumerate(LORAS.items())}


def served(base, adapters) -> tuple[GPT, AdapterSet]:
    model = copy.deepcopy(base)
    adapter_set = AdapterSet(model)
    for name, (adapter, _) in adapters.items():
        adapter_set.add(name, adapter)
    return model, adapter_set


@torch.inference_mode()
def test_each_row_runs_through_its_own_adapter(base, adapters):
    model, adapter_set = served(base, adapters)
    assert adapter_set.names == ("a", "b") and "a" in adapter_set and "c" not in adapter_set
    assert all(isinstance(layer, MultiLoRALinear) for layer in adapter_set.layers.values())
    assert len(adapter_set.layers) == 4 * CONFIG.n_layer  # c_attn, c_proj, c_fc and the MLP's c_proj
    idx = torch.randint(0, CONFIG.vocab_size, (5, 12))
    names = ["a", "b", None, "a", "b"]
    with adapter_set.rows(names):
        logits = model(idx)[0]
    merged = {None: base, **{name: merged for name, (_, merged) in adapters.items()}}
    for row, name in enumerate(names):
        alone = merged[name](idx[row: row + 1])[0][0]
        torch.testing.assert_close(logits[row], alone, atol=1e-5, rtol=0)
        if name is not None:  # the adapter makes a difference the test can see
            assert not torch.allclose(alone, base(idx[row: row + 1])[0][0], atol=1e-2)
    assert all(layer.rows is None for layer in adapter_set.layers.values())  # cleared after the forward
    assert torch.equal(model(idx)[0], base(idx)[0])
    with adapter_set.rows([None] * 5):
        assert torch.equal(model(idx)[0], base(idx)[0])


@torch.inference_mode()
def test_packed_layers_keep_the_adapters(base, adapters):
    model, adapter_set = served(base, adapters)
    model.pack_for_batches()  # the MultiLoRALinear layers are Linears: their shared weights are packed
    idx = torch.randint(0, CONFIG.vocab_size, (3, 4))
    with adapter_set.rows(["b", None, "a"]):
        logits = model(idx)[0]
    for row, merged in ((0, adapters["b"][1]), (1, base), (2, adapters["a"][1])):
        torch.testing.assert_close(logits[row], merged(idx[row: row + 1])[0][0], atol=1e-5, rtol=0)


def test_adapters_that_do_not_fit_are_refused(base, adapters):
    model, adapter_set = served(base, adapters)
    adapter, _ = adapters["a"]
    with pytest.raises(ValueError, match="served already"):
        adapter_set.add("a", adapter)
    with pytest.raises(ValueError, match="adapts no layer"):
        adapter_set.add("c", replace(adapter, tensors={**adapter.tensors, "blocks.9.mlp.c_fc.lora_a": torch.ones(1)}))
    wider, _ = random_adapter(GPT(replace(CONFIG, n_embd=64)), LORAS["a"], 0)
    with pytest.raises(ValueError, match="do not fit"):
        adapter_set.add("c", wider)
    one_half = {name: t for name, t in adapter.tensors.items() if not name.endswith("lora_b")}
    with pytest.raises(ValueError, match="do not fit"):
        adapter_set.add("c", replace(adapter, tensors=one_half))
    assert adapter_set.names == ("a", "b")  # a refused adapter leaves no trace
    assert all(layer.n_adapters == 2 for layer in adapter_set.layers.values())
    with pytest.raises(ValueError, match="no adapter named 'c'"), adapter_set.rows(["a", "c"]):
        pass
    with pytest.raises(ValueError, match="adapters already"):
        AdapterSet(model)
    with_lora = copy.deepcopy(base)
    apply_lora(with_lora, LORAS["a"])
    with pytest.raises(ValueError, match="merge"):
        AdapterSet(with_lora)


def test_adapter_bytes_count_its_tensors(adapters):
    adapter, _ = adapters["b"]
    n = sum(t.numel() for t in adapter.tensors.values())
    assert n == CONFIG.n_layer * 4 * (CONFIG.n_embd + 3 * CONFIG.n_embd + CONFIG.n_embd + 4 * CONFIG.n_embd)
    assert adapter_bytes(adapter) == 4 * n and adapter_bytes(adapter, torch.bfloat16) == 2 * n
