"""Autoregressive generation with the KV cache: whole batches, ragged batches and a token stream."""

from collections.abc import Iterator

import torch
from torch import Tensor

from model.gpt import GPT
from model.linear import linear
from model.sampling import SamplingParams, next_token
from model.streaming import StreamEvent, TextStream, token_event

GREEDY = SamplingParams()


def make_generators(seed: int | None, n: int, device) -> list[torch.Generator] | None:
    """One generator per row, seeded seed, seed+1, ...: the same seed gives the same samples."""
    if seed is None:
        return None
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(n)]


class Decoder:
    """Prefill and one-token steps of a GPT over a KV cache.

    A step's products are thin (one row per sequence); `model.linear` runs them fast on CPU, the LM head
    included, and faster still for several sequences once the model is packed (`GPT.pack_for_batches`).
    """

    def __init__(self, model: GPT, n_slots: int, max_length: int | None = None):
        self.model = model
        self.cache = model.new_cache(n_slots, max_length)

    def head(self, hidden: Tensor) -> Tensor:
        """Logits [B, V] of hidden states [B, C]."""
        return linear(hidden, self.model.output_weight, None, self.model.packed_output)

    def logits(self, idx: Tensor, slots: Tensor | None = None) -> Tensor:
        """Logits [B, V] of the last position after appending idx [B, T] to the rows' caches."""
        hidden = self.model.hidden_states(idx, self.cache, slots)
        return self.head(hidden[:, -1])

    def logits_of_each(self, idx: Tensor, slots: Tensor | None = None) -> Tensor:
        """Logits [B, T, V] of every position after appending idx [B, T] to the rows' caches (to score them)."""
        hidden = self.model.hidden_states(idx, self.cache, slots)  # [B, T, C]
        return self.head(hidden.flatten(0, 1)).unflatten(0, hidden.shape[:2])

    def prefill_ragged(self, prompts: list[list[int]], slots: Tensor) -> Tensor:
        """Prefill prompts of different lengths into the given empty slots; logits [B, V] of each last token.

        Prompts are right-padded and run as one causal batch; positions past a prompt's end are garbage
        in the cache, but each slot's length is set to its prompt, so they are overwritten before use.
        """
        lengths = torch.tensor([len(p) for p in prompts], device=self.cache.lengths.device)
        padded = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long, device=lengths.device)
        for row, prompt in enumerate(prompts):
            padded[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.cache.lengths[slots] = 0
        hidden = self.model.hidden_states(padded, self.cache, slots)  # [B, T, C]
        self.cache.lengths[slots] = lengths
        return self.head(hidden[torch.arange(len(prompts)), lengths - 1])


def _check_prompt(model: GPT, n_prompt: int) -> None:
    if n_prompt < 1:
        raise ValueError("the prompt must hold at least one token")
    if n_prompt > model.config.context_length:
        raise ValueError(f"prompt of {n_prompt} tokens exceeds the context length "
                         f"{model.config.context_length}")


@torch.inference_mode()
def generate(model: GPT, idx: Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_id: int | None = None, seed: int | None = None, use_cache: bool = True) -> Tensor:
    """Continue every row of idx [B, T]; returns [B, T + n].

    n = max_new_tokens unless the context is full first (generation then ends: finish reason `length`)
    or every row has produced eos_id (rows that finished earlier are filled with eos_id).
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty)
    B, T = idx.shape
    _check_prompt(model, T)
    n_new = max(0, min(max_new_tokens, model.config.context_length - T))
    generators = make_generators(seed, B, idx.device)
    out = torch.empty(B, T + n_new, dtype=torch.long, device=idx.device)
    out[:, :T] = idx
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    decoder = Decoder(model, B, T + n_new) if use_cache else None
    for i in range(n_new):
        position = T + i
        if decoder is None:
            logits = model(out[:, :position])[0][:, -1]
        else:
            logits = decoder.logits(out[:, :position] if i == 0 else out[:, position - 1: position])
        token = next_token(logits, params, out[:, :position] if params.uses_history else None, generators,
                           n_prompt=T)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        out[:, position] = token
        if eos_id is not None and bool(done.all()):
            return out[:, : position + 1]
    return out


@torch.inference_mode()
def generate_batch(model: GPT, prompts: list[list[int]], max_new_tokens: int,
                   params: SamplingParams = GREEDY, eos_id: int | None = None,
                   seed: int | None = None) -> list[list[int]]:
    """Continue prompts of different lengths in one batch; the new tokens of each (eos included)."""
    for prompt in prompts:
        _check_prompt(model, len(prompt))
    device = model.wte.weight.device
    B = len(prompts)
    decoder = Decoder(model, B)
    generators = make_generators(seed, B, device)
    limits = [min(max_new_tokens, model.config.context_length - len(p)) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    active = [i for i in range(B) if limits[i] > 0]
    if not active:
        return outputs
    logits = decoder.prefill_ragged([prompts[i] for i in active], torch.tensor(active, device=device))
    while active:
        tokens = torch.cat([
            next_token(logits[row: row + 1], params,
                       torch.tensor([prompts[i] + outputs[i]], device=device) if params.uses_history else None,
                       None if generators is None else [generators[i]], n_prompt=len(prompts[i]))
            for row, i in enumerate(active)
        ]).tolist()
        still = []
        for i, token in zip(active, tokens, strict=True):
            outputs[i].append(token)
            if token != eos_id and len(outputs[i]) < limits[i]:
                still.append(i)
        active = still
        if active:
            last = torch.tensor([[outputs[i][-1]] for i in active], device=device)
            logits = decoder.logits(last, torch.tensor(active, device=device))
    return outputs


@torch.inference_mode()
def stream_generate(model: GPT, tokenizer, prompt: list[int], max_new_tokens: int,
                    params: SamplingParams = GREEDY, eos_id: int | None = None,
                    stop: list[str] | tuple[str, ...] = (), seed: int | None = None
                    ) -> Iterator[StreamEvent]:
    """Generate for one prompt, yielding each token with its text delta; the last event says why it ended.

    The deltas concatenate to the final text, which excludes a matched stop string and the EOS token.
    """
    _check_prompt(model, len(prompt))
    device = model.wte.weight.device
    n_new = min(max_new_tokens, model.config.context_length - len(prompt))
    if n_new < 1:
        return
    decoder = Decoder(model, 1, len(prompt) + n_new)
    generators = make_generators(seed, 1, device)
    text = TextStream(tokenizer, stop)
    history = list(prompt)
    logits = decoder.logits(torch.tensor([prompt], dtype=torch.long, device=device))
    for i in range(n_new):
        seen = torch.tensor([history], device=device) if params.uses_history else None
        token = int(next_token(logits, params, seen, generators, n_prompt=len(prompt)))
        event = token_event(text, token, eos_id, n_new - 1 - i)
        yield event
        if event.finish_reason is not None:
            return
        history.append(token)
        logits = decoder.logits(torch.tensor([[token]], device=device))
