import pytest
import torch

from worker.training import job_devices, pool_device, pool_gpus


def spec(devices, grad_accum_steps: int = 4) -> dict:
    return {"devices": devices, "hyperparameters": {"grad_accum_steps": grad_accum_steps}}


@pytest.fixture
def gpus(monkeypatch):
    """This process sees `count` CUDA devices and is pool process `index`."""
    def see(count: int, index: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr("billiard.process.current_process", lambda: type("Pool", (), {"index": index})())
    return see


def test_without_gpus_each_rank_is_a_cpu_process(gpus):
    gpus(0)
    assert pool_gpus(1) == [] and pool_device(1) == "cpu"
    assert job_devices(spec(1), 1) == ["cpu"]
    assert job_devices({"hyperparameters": {"grad_accum_steps": 1}}, 1) == ["cpu"]  # a job from before devices
    assert job_devices(spec(2), 1) == ["cpu", "cpu"]
    assert job_devices(spec("auto"), 1) == ["cpu"]


def test_a_pool_process_owns_its_share_of_the_gpus(gpus):
    gpus(8, index=1)
    assert pool_gpus(1) == list(range(8)) and pool_gpus(2) == [4, 5, 6, 7] and pool_gpus(8) == [1]
    assert pool_device(2) == "cuda:4"
    assert job_devices(spec(2), 2) == ["cuda:4", "cuda:5"]
    assert job_devices(spec("auto"), 2) == ["cuda:4", "cuda:5", "cuda:6", "cuda:7"]
    assert job_devices(spec("auto", grad_accum_steps=6), 2) == ["cuda:4", "cuda:5", "cuda:6"]  # 3 divides 6
    with pytest.raises(ValueError, match="asks for 8 devices; this worker process has 4 GPU"):
        job_devices(spec(8, grad_accum_steps=8), 2)
    gpus(2, index=3)
    assert pool_gpus(4) == [1]  # more pool processes than GPUs: they share
