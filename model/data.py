"""Pretraining data: a text file tokenized once into a flat binary file of token ids, then windows of it.

Two ways to cut windows, as the two references do:
- nanoGPT: `random_batch` draws batch_size random offsets per step from a torch.Generator;
- the book (GPTDatasetV1): `n_windows` windows `stride` apart, cut by `windows_at`, visited epoch by epoch
  in an order that `epoch_order` reproduces, so a resumed run can skip straight to batch k of epoch e
  (model.objectives.PretrainObjective).

Every window of block_size inputs needs block_size + 1 tokens: the targets are the inputs shifted by one.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.tokenizer import Tokenizer, text_parts


@dataclass(frozen=True)
class TokenFile:
    """What the JSON sidecar beside a token file says about it."""

    path: Path
    dtype: str  # "uint16" or "uint32"
    n_tokens: int
    tokenizer: str  # the tokenizer's spec name, e.g. "gpt2"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id: GPT-2's 50257 ids fit uint16, halving the file."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _file_pieces(path: Path, chunk_chars: int) -> Iterator[str]:
    # newline="" keeps the file's own line endings: the tokens are those of its exact text.
    with open(path, encoding="utf-8", newline="") as f:
        while piece := f.read(chunk_chars):
            yield piece


def tokenize_to_memmap(text_source: str | Path, tokenizer: Tokenizer, out_path: str | Path,
                       chunk_chars: int = 1 << 20) -> TokenFile:
    """Encode a UTF-8 text file into out_path as raw token ids, reading chunk_chars characters at a time
    (more only while no space allows a cut), so the file is never held whole; the ids equal those of
    encoding the whole text at once.

    Special-token text such as <|endoftext|> becomes its id. The JSON sidecar (out_path + ".json") is
    written last, so a token file with a sidecar is complete."""
    if chunk_chars < 1:
        raise ValueError(f"chunk_chars must be >= 1, got {chunk_chars}")
    out_path = Path(out_path)
    _sidecar(out_path).unlink(missing_ok=True)  # a stale sidecar would vouch for a half-written file
    dtype = token_dtype(tokenizer.vocab_size)
    n_tokens = 0
    with open(out_path, "wb") as out:
        for i, part in enumerate(text_parts(_file_pieces(Path(text_source), chunk_chars), chunk_chars)):
            ids = np.asarray(tokenizer.encode_part(part, first=i == 0), dtype=dtype)
            ids.tofile(out)
            n_tokens += len(ids)
    info = TokenFile(out_path, dtype.name, n_tokens, tokenizer.name)
    meta = {"dtype": info.dtype, "n_tokens": n_tokens, "tokenizer": info.tokenizer}
    _sidecar(out_path).write_text(json.dumps(meta, indent=2) + "\n")
    return info


def read_token_info(path: str | Path) -> TokenFile:
    path = Path(path)
    try:
        meta = json.loads(_sidecar(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} has no sidecar {_sidecar(path).name}: was it written by "
                         "tokenize_to_memmap, and did that finish?") from None
    return TokenFile(path, meta["dtype"], int(meta["n_tokens"]), meta["tokenizer"])


def open_tokens(path: str | Path) -> np.memmap:
    """The token ids of a file written by tokenize_to_memmap, read-only and paged in on demand: [N]."""
    info = read_token_info(path)
    expected = info.n_tokens * np.dtype(info.dtype).itemsize
    actual = info.path.stat().st_size
    if actual != expected:
        raise ValueError(f"{info.path} holds {actual} bytes but its sidecar promises {info.n_tokens} "
                         f"{info.dtype} tokens ({expected} bytes)")
    if info.n_tokens == 0:
        raise ValueError(f"{info.path} holds no tokens")
    return np.memmap(info.path, dtype=info.dtype, mode="r", shape=(info.n_tokens,))


def _check_window(n_tokens: int, block_size: int, what: str = "the data") -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if n_tokens < block_size + 1:
        raise ValueError(f"{what} has {n_tokens} tokens; a window of {block_size} needs at least "
                         f"{block_size + 1}")


def split_tokens(tokens: np.ndarray, val_fraction: float, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) views of tokens, validation at the end as nanoGPT and the book do; both must hold at
    least one window of block_size."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_train = int(len(tokens) * (1 - val_fraction))
    train, val = tokens[:n_train], tokens[n_train:]
    _check_window(len(train), block_size, f"the training split ({1 - val_fraction:.0%} of {len(tokens)})")
    _check_window(len(val), block_size, f"the validation split ({val_fraction:.0%} of {len(tokens)})")
    return train, val


def windows_at(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets [len(starts), block_size] of the windows starting at starts."""
    rows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # [B, T + 1]
    rows = torch.from_numpy(rows)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


def random_batch(tokens: np.ndarray, batch_size: int, block_size: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """nanoGPT's get_batch: batch_size windows at random offsets drawn from generator, so the same
    generator state gives the same batch. Returns x, y LongTensors [B, T], y[:, i] == x[:, i + 1]."""
    _check_window(len(tokens), block_size)
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).numpy()
    return windows_at(tokens, starts, block_size)


def n_windows(n_tokens: int, block_size: int, stride: int) -> int:
    """How many windows the book's `range(0, len(tokens) - max_length, stride)` visits."""
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    _check_window(n_tokens, block_size)
    return (n_tokens - block_size - 1) // stride + 1


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    """A permutation of range(n) that depends only on (seed, epoch): a resumed run recomputes the order
    of any epoch without replaying the ones before it."""
    return np.random.default_rng([seed, epoch]).permutation(n)
