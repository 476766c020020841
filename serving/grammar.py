"""Constrained decoding: output that always parses, by masking at each step the tokens a grammar forbids.

The grammars are llguidance's (JSON schemas and regular expressions), chosen over xgrammar and outlines-core
by measured cost per token on the CPU, by how much of JSON Schema each enforces, and by its fit with the engine:
a matcher per sequence, filling the mask of one row (docs/BENCHMARKS.md, "Structured output").

A Grammar is compiled once per tokenizer and spec, off the engine thread, and cached; each sequence decodes
with a Constraint of its own, on the engine thread: the mask of its next token, then the token it took.
"""

import functools
import json
from typing import Literal

import llguidance
import llguidance.torch
import numpy as np
import torch
from llguidance.tiktoken import lltokenizer_from_encoding
from torch import Tensor

# compact JSON, as the official clients' JSON modes print it: no whitespace between the tokens a model may
# otherwise fill a budget with
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """The spec is no grammar llguidance compiles (an unsupported JSON Schema keyword, a bad regex)."""


@functools.lru_cache(maxsize=8)
def _llguidance_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    # ~1 s for GPT-2's vocabulary: once per tokenizer a deployment serves
    if tokenizer.name == "hf":  # a Hugging Face tokenizer.json, which llguidance reads as it is
        return llguidance.LLTokenizer(tokenizer.spec()["tokenizer_json"], n_vocab=vocab_size,
                                      eos_token=tokenizer.eot_id)
    return lltokenizer_from_encoding(tokenizer.encoding, n_vocab=vocab_size)


class Grammar:
    def __init__(self, tokenizer, vocab_size: int, kind: Literal["json_schema", "regex"], source: str):
        if kind == "regex":  # \d and \w as ASCII, as TGI's regexes mean them (llguidance's own are Unicode)
            grammar = llguidance.LLMatcher.grammar_from_lark(f"start: /{llguidance.regex_to_lark(source, 'dw')}/")
        else:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(source, overrides=JSON_FORMAT)
        self.vocab_size = vocab_size
        self.matcher = llguidance.LLMatcher(_llguidance_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())

    def constraint(self) -> "Constraint":
        return Constraint(self.matcher.deep_copy(), self.vocab_size)


@functools.lru_cache(maxsize=64)
def compile_grammar(tokenizer, vocab_size: int, kind: Literal["json_schema", "regex"], source: str) -> Grammar:
    """The grammar of a JSON schema (as JSON text) or a regular expression; GrammarError says why not."""
    return Grammar(tokenizer, vocab_size, kind, source)


def json_schema_source(schema: dict | None) -> str:
    """A JSON schema's text for compile_grammar; None: any JSON object (OpenAI's json_object mode). Its keys keep
    their order: the output's properties come in the schema's order, as clients expect."""
    return json.dumps(ANY_JSON_OBJECT if schema is None else schema, separators=(",", ":"))


class Constraint:
    """One sequence's place in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: Tensor) -> Tensor:
        """logits [1, V] with the tokens the grammar forbids next at -inf."""
        llguidance.torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        # unpacked here rather than with llguidance.torch.apply_token_bitmask_inplace, a torch.compile function
        # that needs a C++ compiler at run time (the images have none) and stalls the engine seconds on first use
        words = self.bitmask[0].numpy().view(np.uint8)  # little-endian: token 32 i + j is bit j of word i
        allowed = torch.from_numpy(np.unpackbits(words, count=logits.shape[-1], bitorder="little"))
        return logits.float().masked_fill(allowed.to(logits.device) == 0, float("-inf"))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")

    @property
    def stopped(self) -> bool:
        """Whether the grammar is complete and only the end of the sequence may follow."""
        return self.matcher.is_stopped()

