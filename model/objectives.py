"""What the Trainer trains on: pretraining, classification finetuning and instruction finetuning.

Each objective turns a global micro-batch index into a batch deterministically (seed + index), so a resumed
run sees exactly the batches an uninterrupted run would have seen.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.data import epoch_order, n_windows, random_batch, windows_at
from model.instruction_data import instruction_collate
from model.loss import perplexity


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def epoch_batches(n_rows: int, batch_size: int) -> int:
    """Batches in an epoch of n_rows: the last rows short of a batch wait for the next epoch's order."""
    return max(1, n_rows // batch_size)


def epoch_rows(n_rows: int, batch_size: int, seed: int, index: int) -> np.ndarray:
    """Rows of batch `index` when every epoch visits all rows once in a seeded random order."""
    epoch, position = divmod(index, epoch_batches(n_rows, batch_size))
    order = epoch_order(n_rows, epoch, seed)
    return order[position * batch_size: (position + 1) * batch_size]


class PretrainObjective:
    """Next-token prediction on token windows: random windows (nanoGPT) or strided windows (the book)."""

    kind = "lm"

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, block_size: int, batch_size: int,
                 seed: int = 1337, stride: int | None = None):
        for name, tokens in (("training", train_tokens), ("validation", val_tokens)):
            if len(tokens) < block_size + 1:
                raise ValueError(f"the {name} split has {len(tokens)} tokens; a window of {block_size} "
                                 f"needs at least {block_size + 1}")
        self.train, self.val = train_tokens, val_tokens
        self.block_size, self.batch_size, self.seed, self.stride = block_size, batch_size, seed, stride

    @property
    def batches_per_epoch(self) -> int:
        """Strided windows: batches that visit each once; random windows: batches of as many tokens as the split."""
        if self.stride is None:
            return epoch_batches(len(self.train), self.batch_size * self.block_size)
        return epoch_batches(n_windows(len(self.train), self.block_size, self.stride), self.batch_size)

    def batch(self, index: int) -> tuple[Tensor, Tensor]:
        if self.stride is None:
            return random_batch(self.train, self.batch_size, self.block_size, _generator(self.seed, index))
        rows = epoch_rows(n_windows(len(self.train), self.block_size, self.stride), self.batch_size,
                           self.seed, index)
        return windows_at(self.train, rows * self.stride, self.block_size)

    def loss(self, model: nn.Module, batch) -> Tensor:
        return model(*batch)[1]

    def n_tokens(self, batch) -> int:
        return batch[0].numel()

    def evaluate(self, model: nn.Module, max_batches: int, autocast) -> dict[str, float]:
        """Mean loss over consecutive windows from the start of the validation split: the same windows
        every time, so numbers are comparable across steps and checkpoints."""
        n_val_windows = n_windows(len(self.val), self.block_size, self.block_size)
        starts = np.arange(min(n_val_windows, max_batches * self.batch_size)) * self.block_size
        total, count = 0.0, 0
        device = next(model.parameters()).device
        for i in range(0, len(starts), self.batch_size):
            x, y = windows_at(self.val, starts[i: i + self.batch_size], self.block_size)
            x, y = x.to(device), y.to(device)
            with autocast():
                total += model(x, y)[1].item() * x.numel()
            count += x.numel()
        loss = total / count
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}


class ClassificationObjective:
    """Texts with labels for a GPTClassifier: batches of right-padded ids, their lengths and labels."""

    kind = "classifier"

    def __init__(self, train: tuple[Tensor, Tensor, Tensor], val: tuple[Tensor, Tensor, Tensor],
                 batch_size: int, seed: int = 1337):
        for name, (ids, lengths, labels) in (("training", train), ("validation", val)):
            if not len(ids) == len(lengths) == len(labels) or len(ids) == 0:
                raise ValueError(f"the {name} set must hold ids, lengths and labels for at least one text")
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed

    @property
    def batches_per_epoch(self) -> int:
        return epoch_batches(len(self.train[0]), self.batch_size)

    @staticmethod
    def _trimmed(ids: Tensor, lengths: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return ids[:, : int(lengths.max())], lengths, labels  # padding past the longest text is wasted work

    def batch(self, index: int):
        rows = torch.from_numpy(epoch_rows(len(self.train[0]), self.batch_size, self.seed, index))
        return self._trimmed(*(t[rows] for t in self.train))

    def loss(self, model: nn.Module, batch) -> Tensor:
        return model(*batch)[1]

    def n_tokens(self, batch) -> int:
        return int(batch[1].sum())

    def evaluate(self, model: nn.Module, max_batches: int, autocast) -> dict[str, float]:
        device = next(model.parameters()).device
        n = min(len(self.val[0]), max_batches * self.batch_size)
        total, correct = 0.0, 0
        for i in range(0, n, self.batch_size):
            rows = slice(i, min(n, i + self.batch_size))
            ids, lengths, labels = (t.to(device) for t in self._trimmed(*(t[rows] for t in self.val)))
            with autocast():
                logits = model(ids, lengths)[0].float()
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += int((logits.argmax(-1) == labels).sum())
        return {"val_loss": total / n, "val_accuracy": correct / n}


class InstructionObjective:
    """Alpaca-style records, already tokenized as (ids, prompt length), for next-token finetuning."""

    kind = "lm"

    def __init__(self, train: list[tuple[list[int], int]], val: list[tuple[list[int], int]], batch_size: int,
                 seed: int = 1337, pad_id: int = 50256, max_length: int | None = None,
                 mask_prompt: bool = False):
        if not train or not val:
            raise ValueError("instruction finetuning needs at least one training and one validation record")
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed
        self.collate = dict(pad_id=pad_id, max_length=max_length, mask_prompt=mask_prompt)

    @property
    def batches_per_epoch(self) -> int:
        return epoch_batches(len(self.train), self.batch_size)

    def batch(self, index: int):
        rows = epoch_rows(len(self.train), self.batch_size, self.seed, index)
        return instruction_collate([self.train[i] for i in rows], **self.collate)

    def loss(self, model: nn.Module, batch) -> Tensor:
        return model(*batch)[1]

    def n_tokens(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def evaluate(self, model: nn.Module, max_batches: int, autocast) -> dict[str, float]:
        device = next(model.parameters()).device
        total, count = 0.0, 0
        n = min(len(self.val), max_batches * self.batch_size)
        for i in range(0, n, self.batch_size):
            records = self.val[i: min(n, i + self.batch_size)]
            x, y = (t.to(device) for t in instruction_collate(records, **self.collate))
            with autocast():
                logits = model(x)[0].float()
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((y != -100).sum())
        loss = total / count
        return {"val_loss": loss, "val_perplexity": perplexity(loss)}


def steps_for_epochs(objective, epochs: float, grad_accum_steps: int) -> int:
    """Optimizer steps that train on `epochs` passes over the objective's training split (at least one)."""
    return max(1, math.ceil(epochs * objective.batches_per_epoch / grad_accum_steps))
