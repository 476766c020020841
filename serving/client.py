"""The asyncio client of the engines: it admits a request to a deployment's engine, delivers the events
the engine thread produces onto the event loop, and turns every way an engine can fail into one of its
errors. The protocol adapters (TGI, OpenAI, classify) translate shapes around it; none of them touches an
engine. Tokenizing and classifying run off the event loop, on texts of a bounded size, and a deployment runs
a bounded number of classification batches at once.
"""

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch

from core.enums import CheckpointTask
from model import SamplingParams, StreamEvent
from model.classification_data import pad_token_ids
from serving.deployments import DeploymentManager, Loaded
from serving.engine import Engine, QueueFull
from serving.engine import Request as EngineRequest
from serving.grammar import Grammar, GrammarError, compile_grammar
from serving.metrics import ServingMetrics

# a stop string is looked for in the text held back after every token, on the engine thread all requests share
MAX_STOP_CHARS = 256


class Overloaded(Exception):
    """The engine is full (every slot busy and the queue at its limit), or the deployment runs as many
    classification batches as it may."""


class GenerationFailed(Exception):
    """The engine failed while generating, or no token came in time."""


class InvalidRequest(Exception):
    """The engine refuses the request as asked (a token id outside the vocabulary, say)."""


class PromptTooLong(Exception):
    """A prompt (or the input-th text to classify) holds more tokens than the model's context allows."""

    def __init__(self, n_tokens: int, context_length: int, input_index: int | None = None):
        super().__init__(f"{n_tokens} tokens; the context is {context_length}")
        self.n_tokens, self.context_length, self.input_index = n_tokens, context_length, input_index


class PromptTooLarge(Exception):
    """A prompt (or the input_index-th text to classify) longer in characters than the service tokenizes."""

    def __init__(self, n_chars: int, limit: int, input_index: int | None = None):
        what = "the prompt" if input_index is None else f"input {input_index}"
        super().__init__(f"{what} holds {n_chars} characters; at most {limit} are accepted")
        self.n_chars, self.limit, self.input_index = n_chars, limit, input_index


def pick_seed(seed: int | None) -> int:
    """The request's seed, or a random one: every sampled answer can be reproduced with the seed it reports."""
    return seed if seed is not None else secrets.randbits(32)


@dataclass(frozen=True)
class Asked:
    """What a request asks of each of its sequences beyond its prompt: the protocols' options, in the engine's
    terms."""

    max_new_tokens: int | None  # None: up to the context; 0: only score the prompt
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None  # sequence i is seeded seed + i
    n: int = 1  # sequences per prompt
    logprobs: int | None = None  # likeliest tokens reported beside each generated one
    prompt_logprobs: int | None = None  # score the prompt, with this many likeliest tokens beside each
    ignore_eos: bool = False
    grammar: Grammar | None = None  # each sequence's output follows it


class _Stream:
    """One sequence admitted to an engine, its events arriving on the event loop that admitted it."""

    def __init__(self, engine: Engine, request: EngineRequest, metrics: ServingMetrics, deployment: str):
        self.time_to_first_token = metrics.time_to_first_token.labels(deployment)
        self.inter_token_latency = metrics.inter_token_latency.labels(deployment)
        self.tokens_generated = metrics.tokens_generated.labels(deployment)
        self.last_event_at = time.monotonic()
        self.first = True
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(event) -> None:  # on the engine thread
            # a closed loop (its server stopped) has nobody left to tell; the engine must go on with the others
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.events.put_nowait, event)

        self.request = request
        request.on_event = deliver
        try:
            engine.submit(request)
        except QueueFull as e:
            raise Overloaded(str(e)) from None
        except ValueError as e:
            raise InvalidRequest(str(e)) from None

    async def next_event(self, timeout_s: float) -> StreamEvent:
        try:
            # asyncio.timeout, not wait_for: no task created per token
            async with asyncio.timeout(timeout_s):
                event = await self.events.get()
        except TimeoutError:
            self.request.abort()
            raise GenerationFailed(f"no token within {timeout_s:.0f} s") from None
        if isinstance(event, Exception):
            raise GenerationFailed(f"generation failed: {event}")
        now = time.monotonic()
        (self.time_to_first_token if self.first else self.inter_token_latency).observe(now - self.last_event_at)
        if event.token_id is not None:
            self.tokens_generated.inc()
        self.first, self.last_event_at = False, now
        return event


class Generation:
    """The sequences of one request (n per prompt, prompt by prompt), admitted together (or not at all); abort()
    ends those still running, and is a no-op for finished ones: call it when the client goes away and when the
    answer is complete."""

    def __init__(self, streams: list[_Stream], prompt_tokens: int, timeout_s: float):
        self.streams, self.prompt_tokens, self.timeout_s = streams, prompt_tokens, timeout_s
        self.completion_tokens = 0

    def request(self, index: int) -> EngineRequest:
        """The index-th sequence's engine request: its prompt, and once it has an event, its prompt's scores."""
        return self.streams[index].request

    def _count(self, event: StreamEvent) -> None:
        self.completion_tokens += event.token_id is not None

    async def events(self) -> AsyncIterator[tuple[int, StreamEvent]]:
        """(sequence index, event) as they come, every sequence to its end."""
        if len(self.streams) == 1:  # the common case, without a task per token
            stream, event = self.streams[0], None
            while event is None or event.finish_reason is None:
                event = await stream.next_event(self.timeout_s)
                self._count(event)
                yield 0, event
            return
        pending = {asyncio.ensure_future(s.next_event(self.timeout_s)): i for i, s in enumerate(self.streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    event = future.result()
                    self._count(event)
                    yield index, event
                    if event.finish_reason is None:
                        pending[asyncio.ensure_future(self.streams[index].next_event(self.timeout_s))] = index
        finally:
            for future in pending:
                future.cancel()

    def abort(self) -> None:
        for stream in self.streams:
            stream.request.abort()


@dataclass(frozen=True)
class Model:
    """A deployment's name, what it serves at the moment a request came (a request keeps to it, whichever
    checkpoint the deployment switches to meanwhile), and the adapter the request chose over it."""

    name: str
    loaded: Loaded
    adapter: str | None = None

    @property
    def id(self) -> str:
        """The model's name as requests give it and answers report it."""
        return self.name if self.adapter is None else f"{self.name}:{self.adapter}"

    @property
    def checkpoint_id(self) -> str:
        return self.loaded.checkpoint_id if self.adapter is None else self.loaded.adapters[self.adapter].checkpoint_id

    @property
    def prompt_format(self) -> str | None:
        """The chat template it was finetuned with: an adapter's own."""
        return self.loaded.prompt_format if self.adapter is None else self.loaded.adapters[self.adapter].prompt_format


@dataclass
class Classified:
    probabilities: torch.Tensor  # [N, classes]
    label_names: list[str]
    n_tokens: int


class EngineClient:
    def __init__(self, deployments: DeploymentManager, metrics: ServingMetrics, timeout_s: float,
                 max_prompt_chars: int, max_classify_batches: int):
        self.deployments, self.metrics, self.timeout_s = deployments, metrics, timeout_s
        self.max_prompt_chars, self.max_classify_batches = max_prompt_chars, max_classify_batches
        self.classifying: dict[str, threading.BoundedSemaphore] = {}  # per deployment: its batches running

    def serving(self, name: str | None, task: CheckpointTask) -> Model:
        """The loaded deployment (and adapter) a model name asks for (None: the default deployment) serving this
        task, or NotServing."""
        served, adapter = self.deployments.serving(name, task)
        return Model(served.name, served.current, adapter)

    def _check_size(self, text: str, input_index: int | None = None) -> None:
        """PromptTooLarge past the limit: tokenizing takes time in proportion to the text."""
        if len(text) > self.max_prompt_chars:
            raise PromptTooLarge(len(text), self.max_prompt_chars, input_index)

    async def grammar(self, model: Model, kind: str, source: str) -> Grammar:
        """The compiled grammar of a JSON schema's text or a regular expression, for the model's tokenizer;
        InvalidRequest says why it does not compile. Compiled off the event loop, and cached."""
        loaded = model.loaded
        try:
            return await asyncio.to_thread(compile_grammar, loaded.tokenizer, loaded.model.config.vocab_size, kind,
                                           source)
        except GrammarError as e:
            raise InvalidRequest(f"the {kind.replace('_', ' ')} does not compile to a grammar: {e}") from None

    async def encode(self, model: Model, text: str) -> list[int]:
        """The prompt's token ids; PromptTooLarge past the size limit."""
        self._check_size(text)
        return await asyncio.to_thread(model.loaded.tokenizer.encode, text, allow_special=False)

    @staticmethod
    def check_fits(model: Model, prompt: list[int], room: int = 1) -> None:
        """PromptTooLong unless room tokens fit after the prompt (0: a prompt only scored)."""
        context = model.loaded.engine.context_length
        if len(prompt) + room > context:
            raise PromptTooLong(len(prompt), context)

    def generate(self, model: Model, prompts: list[list[int]], asked: Asked) -> Generation:
        """Admit asked.n sequences for each prompt, every one or none. PromptTooLong when a prompt leaves no room,
        Overloaded when the engine is full, InvalidRequest when it refuses what is asked."""
        loaded = model.loaded
        engine, context = loaded.engine, loaded.engine.context_length
        for prompt in prompts:
            self.check_fits(model, prompt, room=0 if asked.max_new_tokens == 0 else 1)
        if len(prompts) * asked.n > engine.capacity:
            raise InvalidRequest(f"the request asks for {len(prompts) * asked.n} sequences; deployment {model.name} "
                                 f"holds at most {engine.capacity} at once")
        streams: list[_Stream] = []
        try:
            for prompt in prompts:
                budget = context - len(prompt) if asked.max_new_tokens is None else asked.max_new_tokens
                first = None  # the prompt's first sequence prefills it; the others copy its prefill
                for i in range(asked.n):
                    request = EngineRequest(
                        prompt, budget, asked.params, on_event=None, stop=asked.stop,
                        eos_id=None if asked.ignore_eos else loaded.tokenizer.eot_id,
                        stop_token_ids=asked.stop_token_ids, seed=None if asked.seed is None else asked.seed + i,
                        logprobs=asked.logprobs, prompt_logprobs=asked.prompt_logprobs, twin_of=first,
                        constraint=None if asked.grammar is None else asked.grammar.constraint(),
                        adapter=model.adapter)
                    streams.append(_Stream(engine, request, self.metrics, model.name))
                    first = first or request
        except (Overloaded, InvalidRequest):
            for stream in streams:
                stream.request.abort()
            raise
        return Generation(streams, sum(len(p) for p in prompts), self.timeout_s)

    async def classify(self, model: Model, texts: list[str], truncate: bool) -> Classified:
        """Every class's probability for each text, in one batch; PromptTooLarge names the first text past the
        size limit, PromptTooLong the first too long for the context unless truncate; Overloaded when the
        deployment runs as many batches as it may."""
        for index, text in enumerate(texts):
            self._check_size(text, index)
        loaded = model.loaded
        context = loaded.model.config.context_length
        running = self.classifying.setdefault(model.name, threading.BoundedSemaphore(self.max_classify_batches))
        if not running.acquire(blocking=False):
            raise Overloaded(f"deployment {model.name} runs {self.max_classify_batches} classification batches")

        def run() -> Classified:
            try:
                encoded = loaded.tokenizer.encode_batch(texts, allow_special=False)
                too_long = next((i for i, ids in enumerate(encoded) if len(ids) > context), None)
                if too_long is not None and not truncate:
                    raise PromptTooLong(len(encoded[too_long]), context, input_index=too_long)
                ids, lengths = pad_token_ids(encoded, max_length=context, pad_id=loaded.tokenizer.eot_id)
                probabilities = loaded.model.predict_proba(ids[:, : int(lengths.max())], lengths)
                return Classified(probabilities, loaded.meta["label_names"],
                                  sum(min(len(i), context) for i in encoded))
            finally:
                running.release()

        # shielded: a client that goes away leaves the batch to finish, and to hold its place until then
        return await asyncio.shield(asyncio.to_thread(run))
