"""Choosing the next token from logits: greedy, temperature, top-k, top-p, repetition penalty."""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the sequence

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        """Whether choosing a token looks at the tokens before it (the repetition penalty does)."""
        return self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty: divide positive, multiply negative logits [B, V] of the ids in seen [B, S]."""
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    # a penalty past what the float type holds (1e-300, 1e300) saturates a logit rather than making it inf,
    # and leaves a logit of 0 (neither encouraged nor discouraged) at 0 rather than NaN (0 * inf)
    return logits.scatter(1, seen, picked.nan_to_num(0.0))


def filter_top_k(logits: Tensor, k: int) -> Tensor:
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability adds up to at least p (nucleus)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    sorted_probs = sorted_logits.softmax(dim=-1)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= p  # mass before this token already >= p
    drop_sorted[..., 0] = False  # the likeliest token stays, even for a p that rounds to 0 in float32
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: Tensor, params: SamplingParams, seen: Tensor | None = None,
               generators: list[torch.Generator | None] | None = None) -> Tensor:
    """Next token ids [B] from logits [B, V]; one generator per row makes each row reproducible."""
    if params.repetition_penalty != 1.0 and seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    greedy = logits.argmax(dim=-1)
    if params.greedy:
        return greedy
    scaled = logits.float() / params.temperature
    # Too cold to sample from: the largest scaled logit overflowed float32 (or is NaN, 0 / 0) and softmax would
    # be NaN. Sampling tends to greedy as the temperature falls, so such a row takes the argmax (which no
    # filter removes).
    frozen = ~(scaled.amax(dim=-1) < float("inf"))
    if params.top_k is not None:
        scaled = filter_top_k(scaled, params.top_k)
    if params.top_p is not None:
        scaled = filter_top_p(scaled, params.top_p)
    probs = scaled.softmax(dim=-1).masked_fill(frozen[:, None], 1.0)  # any valid distribution: its draw is unused
    if generators is None:
        sampled = torch.multinomial(probs, 1).squeeze(-1)
    else:
        sampled = torch.cat([torch.multinomial(row[None], 1, generator=g)[0]
                             for row, g in zip(probs, generators, strict=True)])
    return torch.where(frozen, greedy, sampled)
