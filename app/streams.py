"""A request admitted to an inference engine, with its events arriving on the asyncio event loop.

The engine runs on its own thread and calls back there; the callback only hands the event to this loop.
"""

import asyncio
import contextlib
import time

from app.metrics import Metrics
from model import SamplingParams, StreamEvent
from model.engine import Engine, QueueFull
from model.engine import Request as EngineRequest


class Overloaded(Exception):
    """The engine is full: every slot busy and the queue at its limit."""


class GenerationFailed(Exception):
    """The engine failed while generating, or no token came in time."""


class EngineStream:
    def __init__(self, engine: Engine, prompt: list[int], max_new_tokens: int, params: SamplingParams,
                 stop: tuple[str, ...], seed: int | None, eos_id: int | None, metrics: Metrics, deployment: str):
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

        self.request = EngineRequest(prompt, max_new_tokens, params, deliver, eos_id=eos_id, stop=stop, seed=seed)
        try:
            engine.submit(self.request)
        except QueueFull as e:
            raise Overloaded(str(e)) from None

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
        self.tokens_generated.inc()
        self.first, self.last_event_at = False, now
        return event

    def abort(self) -> None:
        """Stop the sequence (a no-op once it finished): the client went away or the request was cancelled."""
        self.request.abort()
