"""A preallocated key/value cache: one slot per sequence, each slot with its own length.

Slots are independent, so sequences of different lengths decode in one batch (the serving engine keeps
requests in slots and lets them join and leave). Keys and values of a forward pass are written at each
slot's current position; a query attends to the keys at or before its own position in its slot.
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class CacheWrite:
    """Where one forward pass writes its keys and values and which keys its queries see.

    Computed once per forward pass and shared by every layer, so per-layer work stays small.
    """

    slots: Tensor | None  # [B] slot of each row; None: rows are slots 0..B-1
    start: int | None  # the one position every row starts at, when they agree
    positions: Tensor  # [B, T] absolute position of each new token
    key_length: int  # keys 0..key_length-1 are read
    mask: Tensor | None  # [B, 1, T, key_length] bool, True = attend; None: plain causal or all keys
    causal: bool  # with mask None: causal within the new tokens (start == 0 prefill)


class KVCache:
    def __init__(self, n_layer: int, n_slots: int, n_kv_head: int, max_length: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layer, n_slots, n_kv_head, max_length, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(n_slots, dtype=torch.long, device=device)  # tokens held per slot
        self.max_length = max_length

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Give slot target the first length positions of slot source (a prompt prefilled once, shared)."""
        self.k[:, target, :, :length] = self.k[:, source, :, :length]
        self.v[:, target, :, :length] = self.v[:, source, :, :length]
        self.lengths[target] = length

    def reset(self, slots: Tensor | None = None) -> None:
        if slots is None:
            self.lengths.zero_()
        else:
            self.lengths[slots] = 0

    def plan(self, n_rows: int, n_new: int, slots: Tensor | None = None) -> CacheWrite:
        """Plan writing n_new tokens for each of n_rows rows after the row's current length.

        Rows are slots 0..n_rows-1 when slots is None, else the given slot indices.
        """
        starts = self.lengths[:n_rows] if slots is None else self.lengths[slots]
        first, last = int(starts.min()), int(starts.max())
        if last + n_new > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; {last + n_new} requested")
        offsets = torch.arange(n_new, device=starts.device)
        positions = starts[:, None] + offsets  # [B, T]
        key_length = last + n_new
        start = first if first == last else None
        if start is not None and (n_new == 1 or start == 0):
            # one new token sees every key; a prefill from 0 is plain causal attention
            return CacheWrite(slots, start, positions, key_length, None, causal=n_new > 1)
        keys = torch.arange(key_length, device=starts.device)
        mask = keys[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, key_length]
        return CacheWrite(slots, start, positions, key_length, mask, causal=False)

    def commit(self, write: CacheWrite, n_new: int) -> None:
        """Advance the written rows' lengths once every layer has stored its keys and values."""
        if write.slots is None:
            self.lengths[: write.positions.shape[0]] += n_new
        else:
            self.lengths[write.slots] += n_new

    def store(self, layer: int, write: CacheWrite, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, H_kv, T, D] of one layer; return the keys and values to attend over."""
        batch, n_new = k.shape[0], k.shape[2]
        k_layer, v_layer = self.k[layer], self.v[layer]
        if write.slots is None and write.start is not None:
            k_layer[:batch, :, write.start: write.start + n_new] = k
            v_layer[:batch, :, write.start: write.start + n_new] = v
            return k_layer[:batch, :, : write.key_length], v_layer[:batch, :, : write.key_length]
        rows = torch.arange(batch, device=k.device) if write.slots is None else write.slots
        row_index = rows[:, None].expand(batch, n_new)
        # advanced indices around a slice put their dims first: [B, T, H_kv, D]
        k_layer[row_index, :, write.positions] = k.transpose(1, 2)
        v_layer[row_index, :, write.positions] = v.transpose(1, 2)
        if write.slots is None:  # rows 0..B-1: the keys are read in place, not gathered into a copy
            return k_layer[:batch, :, : write.key_length], v_layer[:batch, :, : write.key_length]
        return k_layer[rows, :, : write.key_length], v_layer[rows, :, : write.key_length]
