"""Choosing the next token from logits: logit bias, penalties, then greedy or temperature with top-k, top-p
and min-p. The penalties follow vLLM: the repetition penalty (CTRL's) looks at the prompt and the output, the
frequency and presence penalties (OpenAI's, additive) at the output only."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)  # a dozen fields: named, never by position
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None  # keep tokens at least min_p times as likely as the likeliest
    repetition_penalty: float = 1.0  # 1 = off; > 1 discourages tokens already in the prompt or the output
    frequency_penalty: float = 0.0  # subtracted from a token's logit once per time the output holds it
    presence_penalty: float = 0.0  # subtracted from a token's logit if the output holds it at all
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        for token, bias in self.logit_bias:
            if token < 0 or not math.isfinite(bias):
                raise ValueError(f"logit_bias needs token ids >= 0 and finite biases, got {token!r}: {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        """Whether choosing a token looks at the tokens before it (the penalties do)."""
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def changes_logits(self) -> bool:
        """Whether the token is chosen from other than the model's own logits (so greedy is not their argmax)."""
        return self.uses_history or bool(self.logit_bias)


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty: divide positive, multiply negative logits [B, V] of the ids in seen [B, S]."""
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    # a penalty past what the float type holds (1e-300, 1e300) saturates a logit rather than making it inf,
    # and leaves a logit of 0 (neither encouraged nor discouraged) at 0 rather than NaN (0 * inf)
    return logits.scatter(1, seen, picked.nan_to_num(0.0))


def apply_additive_penalties(logits: Tensor, output: Tensor, frequency: float, presence: float) -> Tensor:
    """OpenAI's penalties on logits [B, V]: minus frequency x each token's count in output [B, S], minus
    presence for each token output holds."""
    counts = torch.zeros_like(logits).scatter_add_(1, output, torch.ones_like(output, dtype=logits.dtype))
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: Tensor, bias: tuple[tuple[int, float], ...]) -> Tensor:
    ids = torch.tensor([token for token, _ in bias], device=logits.device)
    values = torch.tensor([value for _, value in bias], device=logits.device, dtype=logits.dtype)
    return logits.index_add(1, ids, values.expand(logits.size(0), -1))


def adjusted_logits(logits: Tensor, params: SamplingParams, history: Tensor | None = None,
                    n_prompt: int = 0) -> Tensor:
    """The logits [B, V] a token is chosen from: biased, and penalized by history [B, S], the prompt's n_prompt
    tokens followed by the output's."""
    if params.logit_bias:
        logits = apply_logit_bias(logits, params.logit_bias)
    if history is None:
        return logits
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and history.size(1) > n_prompt:
        logits = apply_additive_penalties(logits.float(), history[:, n_prompt:], params.frequency_penalty,
                                          params.presence_penalty)
    return logits


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


def filter_min_p(logits: Tensor, min_p: float) -> Tensor:
    """Keep the tokens at least min_p times as probable as the likeliest one."""
    if min_p <= 0:
        return logits
    floor = logits.amax(dim=-1, keepdim=True) + math.log(min_p)
    return logits.masked_fill(logits < floor, float("-inf"))


def next_token(logits: Tensor, params: SamplingParams, history: Tensor | None = None,
               generators: list[torch.Generator | None] | None = None, n_prompt: int = 0) -> Tensor:
    """Next token ids [B] from logits [B, V]; history [B, S] (the prompt's n_prompt tokens, then the output's)
    for the penalties; one generator per row makes each row reproducible."""
    logits = adjusted_logits(logits, params, history, n_prompt)
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
    if params.min_p is not None:
        scaled = filter_min_p(scaled, params.min_p)
    probs = scaled.softmax(dim=-1).masked_fill(frozen[:, None], 1.0)  # any valid distribution: its draw is unused
    if generators is None:
        sampled = torch.multinomial(probs, 1).squeeze(-1)
    else:
        sampled = torch.cat([torch.multinomial(row[None], 1, generator=g)[0]
                             for row, g in zip(probs, generators, strict=True)])
    return torch.where(frozen, greedy, sampled)
