"""Decoding speed with and without constrained decoding (serving/grammar.py, llguidance), at 1 and 8 streams, on
the serving engine itself (no HTTP).

    .venv/bin/python bench/bench_structured.py [--preset small] [--tokens 64] [--rounds 3]

Each round runs, interleaved: free sampling, and sampling that must follow a JSON schema (a person: a name of at
most 12 characters, an age, a colour from a list, up to 3 tags). A constrained sequence ends when its JSON does,
so the rate is generated tokens over wall time. Prints each case's median tokens/s and the constrained/free ratio.
"""

import argparse
import json
import statistics
import threading
import time

import torch

from model import GPT, GPTConfig, SamplingParams, gpt2_tokenizer
from serving.engine import Engine, Request
from serving.grammar import compile_grammar, json_schema_source

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "color": {"enum": ["red", "green", "blue"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
    "required": ["name", "age", "color", "tags"], "additionalProperties": False}


def rate(engine: Engine, prompt: list[int], streams: int, tokens: int, grammar) -> float:
    """Generated tokens per second of `streams` sampled sequences submitted together."""
    generated, finished, done = [0], [0], threading.Event()

    def on_event(event) -> None:
        if isinstance(event, Exception):
            raise event
        generated[0] += 1
        if event.finish_reason is not None:
            finished[0] += 1
            if finished[0] == streams:
                done.set()

    started = time.perf_counter()
    for seed in range(streams):
        engine.submit(Request(prompt, tokens, SamplingParams(temperature=1.0), on_event, seed=seed,
                              eos_id=engine.tokenizer.eot_id,
                              constraint=None if grammar is None else grammar.constraint()))
    done.wait()
    return generated[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(args.preset)).eval()
    tokenizer = gpt2_tokenizer()
    started = time.perf_counter()
    grammar = compile_grammar(tokenizer, model.config.vocab_size, "json_schema", json_schema_source(SCHEMA))
    print(f"compiling the schema (and llguidance's view of GPT-2's vocabulary, once): "
          f"{time.perf_counter() - started:.2f} s")
    engine = Engine(model, tokenizer, max_batch=8, max_queue=8).start()
    prompt = tokenizer.encode("A person, as JSON:")
    try:
        rate(engine, prompt, 8, 8, grammar)  # warm-up
        rates = {(streams, constrained): [] for streams in (1, 8) for constrained in (False, True)}
        for _ in range(args.rounds):
            for streams, constrained in rates:
                rates[streams, constrained].append(rate(engine, prompt, streams, args.tokens,
                                                        grammar if constrained else None))
    finally:
        engine.stop()
    print(f"{args.preset}, up to {args.tokens} tokens per stream, {args.rounds} interleaved rounds (medians)")
    for streams in (1, 8):
        free, constrained = (statistics.median(rates[streams, c]) for c in (False, True))
        print(f"  {streams} stream(s): free {free:.0f} tok/s, JSON schema {constrained:.0f} tok/s, "
              f"constrained/free {constrained / free:.2f}")
    print(json.dumps({f"{s}x{'json' if c else 'free'}": [round(r) for r in v] for (s, c), v in rates.items()}))


if __name__ == "__main__":
    main()
