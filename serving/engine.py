"""A continuous-batching inference engine for one model, on its own thread.

Requests join the running batch at any decode step and leave it when they finish. Each request has its
own slot in a shared KV cache, its own sampling parameters, seed, stop strings and token budget. A new
request's prompt is prefilled in chunks between decode steps, so a long prompt does not stall the
sequences already running for long. Sequences of one prompt (n, best_of) prefill it once: the first does,
and the others copy its keys and values. A request with a grammar (serving.grammar) chooses each token among
those its grammar allows. A request may name one of the engine's LoRA adapters (model.multi_lora), served
unmerged over the one base model: requests for different adapters and for the base decode in the same batch
step, each row through its own adapter. Events are handed to each request's callback on the engine thread.

A failure in one request's own work (its prefill, its sampling, its events, its callback) fails that request
alone; only a failure of the batched decode step fails every request in flight.
"""

import contextlib
import heapq
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.generate import Decoder, make_generators
from model.gpt import GPT
from model.lora import Adapter
from model.multi_lora import AdapterSet
from model.sampling import SamplingParams, next_token
from model.streaming import StreamEvent, TextStream, TokenLogprob, token_event
from serving.grammar import Constraint

PREFILL_CHUNK = 128  # prompt tokens prefilled per engine iteration
log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The engine holds as many waiting requests as it may: try again later."""


@dataclass
class Request:
    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams
    on_event: Callable[[StreamEvent | Exception], None]
    eos_id: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # report this many likeliest tokens beside each generated one
    prompt_logprobs: int | None = None  # score the prompt's tokens, reporting this many likeliest beside each
    aborted: bool = False
    twin_of: "Request | None" = None  # a request with the same prompt, whose prefill this one copies
    constraint: Constraint | None = None  # a grammar the output must follow (serving.grammar)
    adapter: str | None = None  # the name of the engine's LoRA adapter it runs through; None: the base model
    # engine state
    slot: int = -1  # -1 while it holds none: waiting, or ended
    prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    logits: torch.Tensor | None = None  # of the next token, once the prompt is prefilled
    prompt_logits: torch.Tensor | None = None  # of the token after the prompt: what a twin starts from
    prompt_scores: list[TokenLogprob] = field(default_factory=list)  # complete before the first event

    def abort(self) -> None:
        """Stop generating for this request at the next engine iteration (client gone, timeout)."""
        self.aborted = True


class Engine:
    def __init__(self, model: GPT, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 adapters: dict[str, Adapter] | None = None):
        self.model = model.eval()
        self.adapter_set = AdapterSet(model) if adapters else None  # its layers are packed below, as the base's
        for name, adapter in (adapters or {}).items():
            self.adapter_set.add(name, adapter)
        if max_batch > 1:
            model.pack_for_batches()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.decoder = Decoder(model, max_batch)
        self.free_slots = list(range(max_batch))  # a heap
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.wakeup = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="inference-engine", daemon=True)
        self.decode_steps = 0

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.wakeup:
            self.stopped = True
            self.wakeup.notify()
        self.thread.join()

    @property
    def device(self) -> torch.device:
        return self.decoder.cache.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.cache.k.dtype

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    @property
    def capacity(self) -> int:
        """Requests it holds at once: decoding and waiting."""
        return self.max_batch + self.max_queue

    @property
    def adapters(self) -> tuple[str, ...]:
        """The names of the adapters a request may ask for."""
        return () if self.adapter_set is None else self.adapter_set.names

    @property
    def load(self) -> tuple[int, int]:
        """(waiting requests, running sequences)."""
        return len(self.waiting), len(self.running)

    def submit(self, request: Request) -> Request:
        if not request.prompt:
            raise ValueError("the prompt must hold at least one token")
        scoring_only = request.prompt_logprobs is not None and request.max_new_tokens == 0
        if request.max_new_tokens < 1 and not scoring_only:
            raise ValueError("max_new_tokens must be at least 1 (0 only to score the prompt)")
        if len(request.prompt) + (0 if scoring_only else 1) > self.context_length:
            raise ValueError(f"prompt of {len(request.prompt)} tokens leaves no room in the context length "
                             f"{self.context_length}")
        # an id past the embedding fails on the device, and on a GPU takes every other request down with it
        vocab = self.model.config.vocab_size
        ids = [*request.prompt, *request.stop_token_ids, *(token for token, _ in request.params.logit_bias)]
        if not 0 <= min(ids) <= max(ids) < vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        if request.twin_of is not None and request.twin_of.prompt != request.prompt:
            raise ValueError("a twin shares its first's prompt: the prompts differ")
        if request.adapter is not None and request.adapter not in self.adapters:
            served = f"this model has: {', '.join(self.adapters)}" if self.adapters else "this model has no adapters"
            raise ValueError(f"no adapter named {request.adapter!r}; {served}")
        if request.twin_of is not None and request.twin_of.adapter != request.adapter:
            raise ValueError("a twin shares its first's adapter: the adapters differ")
        for asked in (request.logprobs, request.prompt_logprobs):
            if asked is not None and not 0 <= asked <= vocab:
                raise ValueError(f"the likeliest tokens reported must number between 0 and {vocab}")
        with self.wakeup:
            if self.stopped:
                raise RuntimeError("the engine is stopped")
            # a request waits in the queue only while no slot is free for it
            if len(self.waiting) >= self.max_queue + len(self.free_slots):
                raise QueueFull(f"all {self.max_batch} sequences are running and {len(self.waiting)} requests "
                                f"are waiting")
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    # -- the engine thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self.wakeup:
                while not self.stopped and not self.waiting and not self.running:
                    self.wakeup.wait()
                if self.stopped:
                    break
                self._admit()
            with torch.inference_mode():
                try:
                    self._prefill_step()
                    self._decode_step()
                except Exception as e:  # the batched step failed: every request in flight learns of it
                    for request in list(self.running):
                        self._fail(request, e)
        for request in [*self.running, *self.waiting]:
            self._fail(request, RuntimeError("the engine stopped"))

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            request = self.waiting.popleft()
            if request.aborted:
                continue
            request.slot = heapq.heappop(self.free_slots)  # the lowest: rows stay in slots 0..B-1
            self.running.append(request)
            try:
                request.text = TextStream(self.tokenizer, request.stop)
                request.generator = (make_generators(request.seed, 1, self.device) or [None])[0]
                twin = request.twin_of
                if twin is not None and twin.slot < 0:  # it ended, or never ran: nothing to copy
                    request.twin_of = None
                elif twin is not None and twin.prompt_logits is not None:
                    self._copy_prefill(twin, request)
            except Exception as e:  # a seed torch refuses, say
                self._fail(request, e)

    def _end(self, request: Request) -> None:
        """Take the request out of the batch; its slot is free, and empty for the next one."""
        for other in self.running:  # a twin still waiting for this prompt's prefill does its own
            if other.twin_of is request:
                other.twin_of = None
        self.running.remove(request)
        self.decoder.cache.lengths[request.slot] = 0
        heapq.heappush(self.free_slots, request.slot)
        request.slot = -1

    def _fail(self, request: Request, error: Exception) -> None:
        """End this request with the error, the others going on."""
        if request.slot >= 0:
            self._end(request)
        try:
            request.on_event(error)
        except Exception:  # its callback refuses even the error: nobody is left to tell
            log.exception("the callback of a failed request raised")

    def _prefill_step(self) -> None:
        """Advance the prompt of one request that is still being prefilled, by one chunk (a twin waits for the
        request whose prefill it copies)."""
        for request in self.running:
            if request.logits is None and not request.aborted and request.twin_of is None:
                try:
                    self._prefill_chunk(request)
                except Exception as e:
                    self._fail(request, e)
                return

    def _prefill_chunk(self, request: Request) -> None:
        start = request.prefilled
        chunk = request.prompt[start: start + PREFILL_CHUNK]
        idx = torch.tensor([chunk], device=self.device)
        slots = torch.tensor([request.slot], device=idx.device)
        with self._adapters([request.adapter]):
            if request.prompt_logprobs is None:
                logits = self.decoder.logits(idx, slots)
            else:
                every = self.decoder.logits_of_each(idx, slots)[0]  # [T, V]
                self._score_prompt(request, every, start)
                logits = every[-1:]
        request.prefilled += len(chunk)
        if request.prefilled < len(request.prompt):
            return
        request.prompt_logits = logits
        for twin in [other for other in self.running if other.twin_of is request]:
            self._copy_prefill(request, twin)
        self._prefilled(request)

    def _adapters(self, names: list[str | None]) -> contextlib.AbstractContextManager:
        """Run the forwards inside with batch row i through the adapter names[i] (None: the base)."""
        return contextlib.nullcontext() if self.adapter_set is None else self.adapter_set.rows(names)

    def _copy_prefill(self, source: Request, twin: Request) -> None:
        """Give twin the prompt source prefilled: its keys and values, scores and next-token logits."""
        self.decoder.cache.copy_prefix(source.slot, twin.slot, len(source.prompt))
        twin.twin_of = None
        twin.prefilled = len(twin.prompt)
        twin.prompt_scores, twin.prompt_logits = source.prompt_scores, source.prompt_logits
        self._prefilled(twin)

    def _prefilled(self, request: Request) -> None:
        if request.max_new_tokens == 0:  # scored, nothing to generate
            self._end(request)
            request.on_event(StreamEvent(None, "", "length"))
        else:
            request.logits = request.prompt_logits

    @staticmethod
    def _likeliest(logprobs: torch.Tensor, k: int | None) -> list[list[tuple[int, float]]]:
        """The k likeliest (token id, logprob) of each row of logprobs [T, V], best first."""
        if not k:
            return [[] for _ in range(len(logprobs))]
        values, ids = logprobs.topk(k, dim=-1)
        return [list(zip(row_ids, row_values, strict=True)) for row_ids, row_values in zip(ids.tolist(),
                                                                                        values.tolist(), strict=True)]

    def _score_prompt(self, request: Request, logits: torch.Tensor, start: int) -> None:
        """Score the prompt tokens that the chunk's positions [T, V] predict: position i predicts token i + 1."""
        if start == 0:
            request.prompt_scores.append(TokenLogprob(request.prompt[0], None, []))
        targets = request.prompt[start + 1: start + 1 + len(logits)]  # the last position may predict the output
        logprobs = torch.log_softmax(logits[: len(targets)].float(), dim=-1)
        chosen = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0].tolist()
        request.prompt_scores += [TokenLogprob(token, logprob, top) for token, logprob, top in zip(
            targets, chosen, self._likeliest(logprobs, request.prompt_logprobs), strict=True)]

    def _decode_step(self) -> None:
        ready = []
        for request in list(self.running):
            if request.aborted:
                self._end(request)
            elif request.logits is not None:
                ready.append(request)
        if not ready:
            return
        logits = torch.cat([request.logits for request in ready])  # [B, V]
        chosen = logits.argmax(dim=-1)  # [B]: right for every greedy row that keeps the model's logits
        failed = set()
        for row, request in enumerate(ready):
            if request.params.greedy and not request.params.changes_logits and request.constraint is None:
                continue
            try:
                chosen[row] = self._sample(request, logits[row: row + 1])
            except Exception as e:
                self._fail(request, e)
                failed.add(row)
        scores = logits.float()
        normalizer = torch.logsumexp(scores, dim=-1)  # [B]
        logprobs = (scores.gather(1, chosen[:, None])[:, 0] - normalizer).tolist()
        tokens = chosen.tolist()
        continuing = []
        for row, (request, token, logprob) in enumerate(zip(ready, tokens, logprobs, strict=True)):
            if row in failed:
                continue
            try:
                top = None if request.logprobs is None else self._likeliest(
                    scores[row: row + 1] - normalizer[row], request.logprobs)[0]
                if self._emit(request, token, logprob, top):
                    continuing.append((request, token))
            except Exception as e:
                self._fail(request, e)
        if not continuing:
            return
        # rows in slot order; when they fill slots 0..B-1 the cache is read in place
        continuing.sort(key=lambda pair: pair[0].slot)
        idx = torch.tensor([[t] for _, t in continuing], device=self.device)
        in_order = [r.slot for r, _ in continuing] == list(range(len(continuing)))
        slots = None if in_order else torch.tensor([r.slot for r, _ in continuing], device=idx.device)
        with self._adapters([r.adapter for r, _ in continuing]):
            logits = self.decoder.logits(idx, slots)
        for row, (request, _) in enumerate(continuing):
            request.logits = logits[row: row + 1]
        self.decode_steps += 1

    def _sample(self, request: Request, logits: torch.Tensor) -> torch.Tensor:
        """The request's next token id from its logits [1, V]."""
        history = (torch.tensor([request.prompt + request.generated], device=logits.device)
                   if request.params.uses_history else None)
        generators = None if request.generator is None else [request.generator]
        if request.constraint is not None:  # what the grammar forbids stays forbidden whatever the bias or penalty
            logits = request.constraint.mask(logits)
        return next_token(logits, request.params, history, generators, n_prompt=len(request.prompt))[0]

    def _emit(self, request: Request, token: int, logprob: float, top: list[tuple[int, float]] | None) -> bool:
        """Hand the token to the request; False when the request has finished."""
        if request.constraint is not None:
            request.constraint.advance(token)
        if token != request.eos_id:
            request.generated.append(token)
        tokens_left = min(request.max_new_tokens - len(request.generated),
                          self.context_length - len(request.prompt) - len(request.generated))
        event = token_event(request.text, token, request.eos_id, tokens_left, logprob, request.stop_token_ids)
        event.top_logprobs = top
        if event.finish_reason is not None:
            self._end(request)
        request.on_event(event)
        return event.finish_reason is None
