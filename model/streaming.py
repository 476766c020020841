"""Turning generated token ids into text deltas that are safe to send to a client.

Two things are held back until they resolve: bytes of a UTF-8 character split over two BPE tokens, and
text that could be the beginning of a stop string. So the concatenated deltas always equal the final
text, and a stop string never leaks, not even half of it.
"""

import codecs
from dataclasses import dataclass


@dataclass
class StreamEvent:
    token_id: int | None  # None on the one event of a request that only scores its prompt
    text: str  # the text this token makes safe to emit; may be empty
    finish_reason: str | None = None  # `length`, `eos` or `stop` on the last event
    logprob: float | None = None  # log-probability of the token under the model (before sampling filters)
    top_logprobs: list[tuple[int, float]] | None = None  # the likeliest tokens there, best first, when asked


@dataclass
class TokenLogprob:
    """A prompt token scored by the model: its log-probability given the tokens before it."""

    token_id: int
    logprob: float | None  # None for the first token: nothing comes before it
    top_logprobs: list[tuple[int, float]]  # the likeliest tokens at its position, best first


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far, stop string included
        self._emitted = 0  # characters of self.text already handed out
        self.stopped_by: str | None = None  # the stop string that ended the stream

    @property
    def final_text(self) -> str:
        """The text handed out once the stream is finished: up to, not including, a stop string."""
        return self.text[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to emit (may be empty)."""
        if self.stopped_by is not None:
            raise RuntimeError("the stream already ended on a stop string")
        self.text += self._decoder.decode(self.tokenizer.decode_bytes([token_id]))
        hit = self._find_stop()
        if hit is not None:
            index, self.stopped_by = hit
            return self._emit_until(index)
        return self._emit_until(len(self.text) - self._held_back())

    def finish(self) -> str:
        """The stream ended without a stop string: flush whatever was held back."""
        if self.stopped_by is None:
            self.text += self._decoder.decode(b"", final=True)
            return self._emit_until(len(self.text))
        return ""

    def _emit_until(self, end: int) -> str:
        delta = self.text[self._emitted: end]
        self._emitted = max(self._emitted, end)
        return delta

    def _find_stop(self) -> tuple[int, str] | None:
        longest = max((len(s) for s in self.stop), default=0)
        search_from = max(0, self._emitted - longest + 1)
        found = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Length of the longest tail of the unemitted text that is a prefix of a stop string."""
        pending = self.text[self._emitted:]
        for size in range(min(len(pending), max((len(s) for s in self.stop), default=0)), 0, -1):
            tail = pending[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0


def token_event(text: TextStream, token: int, eos_id: int | None, tokens_left: int,
                logprob: float | None = None, stop_ids: tuple[int, ...] = ()) -> StreamEvent:
    """The event of a newly generated token, and whether it ends the sequence: the EOS token or one of stop_ids
    (never emitted), a stop string (never emitted), or no budget left after it (tokens_left: what the token
    budget and the context still allow after this one)."""
    if token == eos_id:
        return StreamEvent(token, text.finish(), "eos", logprob)
    if token in stop_ids:
        return StreamEvent(token, text.finish(), "stop", logprob)
    delta = text.push(token)
    if text.stopped_by is not None:
        return StreamEvent(token, delta, "stop", logprob)
    if tokens_left <= 0:
        return StreamEvent(token, delta + text.finish(), "length", logprob)
    return StreamEvent(token, delta, None, logprob)
