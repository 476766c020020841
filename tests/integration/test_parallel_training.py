"""Data-parallel training with gloo on the CPU: two processes take the steps one process takes with the same
global batch, a stopped two-process run resumes onto the identical curve, rank 0 alone reports and writes
checkpoints, and rank 0's stop ends every rank at the same step."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import GPT, Callback, GPTConfig, PretrainObjective, TrainConfig, Trainer, gpt2_tokenizer, load_checkpoint
from tests.helpers import free_port

CONFIG = dict(vocab_size=50257, context_length=16, n_layer=2, n_head=2, n_embd=32)
STEPS = 6
# bench/gpu_check.py runs the first test on two GPUs (NCCL) with this set to cuda
DEVICE = os.environ.get("SCRATCHLLM_PARALLEL_TEST_DEVICE", "cpu")


@dataclass
class Run:
    out_dir: str
    dropout: float = 0.0
    stop_at: int | None = None  # rank 0's callback asks to stop before this step
    resume_from: str | None = None


class Recorder(Callback):
    def __init__(self, stop_at: int | None):
        self.stop_at, self.step, self.events = stop_at, 0, []

    def on_progress(self, progress) -> None:
        self.step = progress.step
        self.events.append(["progress", progress.step, progress.train_loss, progress.tokens_seen])

    def on_checkpoint(self, step, path, metrics) -> None:
        self.events.append(["checkpoint", step])

    def should_stop(self) -> bool:
        return self.stop_at is not None and self.step >= self.stop_at


def train(run: Run, rank: int = 0) -> dict:
    torch.manual_seed(0)
    model = GPT(GPTConfig(**CONFIG, dropout=run.dropout))
    tokens = np.random.default_rng(0).integers(0, 50257, 4000).astype(np.uint16)
    objective = PretrainObjective(tokens[:3500], tokens[3500:], block_size=16, batch_size=2, seed=7)
    config = TrainConfig(max_steps=STEPS, learning_rate=3e-3, grad_accum_steps=4, eval_interval=0,
                         eval_batches=2, checkpoint_interval=3, device=f"cuda:{rank}" if DEVICE == "cuda" else "cpu")
    recorder = Recorder(run.stop_at)
    trainer = Trainer(model, objective, config, gpt2_tokenizer(), Path(run.out_dir) / f"rank{rank}", recorder,
                      seed=5)
    if run.resume_from:
        model.load_state_dict(load_checkpoint(run.resume_from)[0].state_dict())
        trainer.resume(run.resume_from)
    result = trainer.train()
    return {"status": result.status, "step": result.step, "losses": result.train_losses,
            "events": recorder.events, "weights": [p.detach().flatten()[:64].tolist() for p in model.parameters()]}


def _rank(rank: int, world: int, port: int, run: Run) -> None:
    torch.set_num_threads(1)
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        outcome = train(run, rank)
    finally:
        dist.destroy_process_group()
    Path(run.out_dir).mkdir(parents=True, exist_ok=True)  # (rank 0's checkpoints make it, maybe not yet)
    (Path(run.out_dir) / f"rank{rank}.json").write_text(json.dumps(outcome))


def train_on_two(run: Run) -> list[dict]:
    mp.start_processes(_rank, args=(2, free_port(), run), nprocs=2, start_method="spawn")
    return [json.loads((Path(run.out_dir) / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_processes_take_the_steps_of_one_with_the_same_global_batch(tmp_path):
    alone = train(Run(str(tmp_path / "alone")))
    first, second = train_on_two(Run(str(tmp_path / "two")))
    assert np.allclose(first["losses"], alone["losses"], rtol=1e-5, atol=1e-6), (first["losses"], alone["losses"])
    assert first["losses"] == second["losses"]  # every rank reports the loss of the whole global batch
    assert len(first["losses"]) == STEPS and first["losses"][-1] < first["losses"][0]
    for ours, theirs in zip(first["weights"], alone["weights"], strict=True):
        assert np.allclose(ours, theirs, rtol=1e-4, atol=1e-5)  # Adam turns float-order noise into ~1e-6
    assert first["weights"] == second["weights"]  # the ranks stay in step
    tokens_per_step = 4 * 2 * 16  # grad_accum_steps x batch_size x block_size, whatever the number of ranks
    assert [e[3] for e in first["events"] if e[0] == "progress"] == [tokens_per_step * (s + 1) for s in range(STEPS)]
    # rank 0 alone reports and writes checkpoints
    assert [e for e in first["events"] if e[0] == "checkpoint"] == [["checkpoint", 3], ["checkpoint", 6]]
    assert second["events"] == []
    assert sorted(p.name for p in (tmp_path / "two" / "rank0").iterdir()) == ["step-0000003", "step-0000006"]
    assert not (tmp_path / "two" / "rank1").exists()


def test_a_stop_on_rank_0_ends_every_rank_and_the_resumed_run_repeats_the_curve(tmp_path):
    whole, _ = train_on_two(Run(str(tmp_path / "whole"), dropout=0.2))
    stopped = train_on_two(Run(str(tmp_path / "stopped"), dropout=0.2, stop_at=2))
    assert [(r["status"], r["step"]) for r in stopped] == [("stopped", 2), ("stopped", 2)]
    assert [e for e in stopped[0]["events"] if e[0] == "checkpoint"] == [["checkpoint", 2]]  # the stop's own
    resumed, _ = train_on_two(Run(str(tmp_path / "resumed"), dropout=0.2,
                                  resume_from=str(tmp_path / "stopped" / "rank0" / "step-0000002")))
    assert stopped[0]["losses"] + resumed["losses"] == whole["losses"]  # dropout's draws resumed on each rank
    assert resumed["weights"] == whole["weights"]


def test_the_global_batch_must_split_evenly_across_ranks():
    from model.parallel import micro_batches

    assert list(micro_batches(2, 4, rank=1, world=2)) == [10, 11]
    assert list(micro_batches(2, 4, rank=0, world=1)) == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="grad_accum_steps \\(3\\) must be a multiple of the number of devices"):
        micro_batches(0, 3, rank=0, world=2)
    assert os.environ.get("WORLD_SIZE") is None  # nothing leaks into the test process
