"""Helpers shared by the learning benchmarks (bench_verdict, bench_spam, bench_instruct)."""

import os
import tempfile
import time
from pathlib import Path

import torch

from model.trainer import Callback, Trainer

DATA_DIR = Path(os.environ.get("SCRATCHLLM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
TIKTOKEN_CACHE = DATA_DIR.parent / "tiktoken_cache"


def setup(threads: int) -> None:
    """Pin the thread count (the machine may be shared) and point tiktoken at the offline GPT-2 files."""
    torch.set_num_threads(threads)
    if TIKTOKEN_CACHE.is_dir():
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))


class Clock:
    """Wall time since creation, printed as e.g. `[  12.3 s]`."""

    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def __str__(self) -> str:
        return f"[{self.seconds():7.1f} s]"


class PrintProgress(Callback):
    """Prints the training loss every `every` steps and every evaluation."""

    def __init__(self, clock: Clock, every: int):
        self.clock, self.every = clock, every

    def on_progress(self, progress) -> None:
        if progress.step % self.every == 0 or progress.step == progress.total_steps:
            print(f"{self.clock} step {progress.step:5d}/{progress.total_steps}  "
                  f"train loss {progress.train_loss:.3f}  lr {progress.learning_rate:.2e}", flush=True)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "train_loss" not in metrics:  # an evaluation
            shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            print(f"{self.clock} step {step:5d}  {shown}", flush=True)


def register_checkpoint(data_dir: Path, database_url: str, directory: Path) -> str:
    """Record a checkpoint saved under the service's data dir, as a finished training job records its own."""
    from core.checkpoints import register_checkpoint as register
    from core.db import Database
    from core.storage import DataDir
    from model import read_metadata

    database = Database(database_url)
    with database.session() as session:
        checkpoint_id = register(session, DataDir(data_dir), directory, read_metadata(directory)).id
    database.dispose()
    return checkpoint_id


def train(model, task, config, tokenizer, callback: Callback, seed: int, **trainer_args):
    """Run a Trainer with its checkpoints in a temporary directory that is deleted afterwards:
    the benchmarks keep their figures, not their weights."""
    with tempfile.TemporaryDirectory(prefix="scratchllm-bench-") as out_dir:
        trainer = Trainer(model, task, config, tokenizer, out_dir, callback=callback, seed=seed,
                          **trainer_args)
        return trainer.train()
