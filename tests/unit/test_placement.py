import pytest
import torch

from core.enums import CheckpointTask
from model.memory import serving_bytes, weight_bytes
from serving.deployments import memory_estimate, over_budget
from serving.placement import Budget, Placement, PlacementError, resolve
from tests.helpers import TINY_LM


@pytest.fixture
def two_gpus(monkeypatch):
    """This process sees two CUDA devices of 80 GiB that support bfloat16 (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr("serving.placement.device_memory_bytes", lambda device: 80 * 1024**3)


def test_auto_is_the_cpu_in_float32_without_a_gpu():
    assert torch.cuda.device_count() == 0 or not torch.cuda.is_available()
    assert resolve() == resolve("auto", "auto") == Placement(torch.device("cpu"), torch.float32)
    assert resolve("cpu", "bfloat16") == Placement(torch.device("cpu"), torch.bfloat16)
    assert resolve("auto", "float16").dtype == torch.float16
    with pytest.raises(PlacementError, match="'cuda:0' is not on this machine: it has no CUDA devices"):
        resolve("cuda:0")


def test_auto_is_the_first_gpu_in_bfloat16_where_there_is_one(two_gpus, monkeypatch):
    assert resolve() == Placement(torch.device("cuda", 0), torch.bfloat16)
    assert resolve("cuda") == resolve("cuda:0") and resolve("cuda:1", "float32").device == torch.device("cuda", 1)
    assert resolve("cuda:01").device == torch.device("cuda", 1)  # torch.device itself refuses "cuda:01"
    assert resolve("cpu").dtype == torch.float32  # bfloat16 is auto only where it is fast
    with pytest.raises(PlacementError, match="it has 2 CUDA devices"):
        resolve("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)  # a V100
    assert resolve().dtype == torch.float32


def test_only_a_cpu_float32_deployment_keeps_a_packed_copy():
    config = TINY_LM.to_dict()
    cpu32, cpu16 = resolve("cpu", "float32"), resolve("cpu", "bfloat16")
    assert cpu32.packs_weights and not cpu16.packs_weights and (cpu32.dtype_bytes, cpu16.dtype_bytes) == (4, 2)
    assert memory_estimate(config, CheckpointTask.LM, 8, cpu32) == serving_bytes(TINY_LM, 8)
    assert memory_estimate(config, CheckpointTask.LM, 8, cpu16) == serving_bytes(TINY_LM, 8, 2, packed=False)
    assert memory_estimate(config, CheckpointTask.CLASSIFIER, 8, cpu16) == weight_bytes(TINY_LM, 2)
    assert memory_estimate(config, CheckpointTask.CLASSIFIER, 8, cpu32) == 2 * weight_bytes(TINY_LM)


def test_a_gpu_budget_is_a_fraction_of_its_memory(two_gpus):
    gpu = resolve("cuda:1")
    budget = Budget.of(gpu, max_cpu_bytes=1024, gpu_fraction=0.5)
    assert budget.bytes == 40 * 1024**3 and "serving_gpu_memory_fraction 0.5 of cuda:1's 80.0 GiB" in budget.source
    assert Budget.of(resolve("cpu"), 1024, 0.5) == Budget(1024, "max_serving_memory_bytes")
    assert over_budget("ckpt_a", gpu, 30 * 1024**3, 10 * 1024**3, budget) is None
    refusal = over_budget("ckpt_a", gpu, 30 * 1024**3, 11 * 1024**3, budget)
    assert "30.0 GiB to serve on cuda:1 bfloat16" in refusal and "11.0 GiB the other deployments on cuda:1" in refusal
