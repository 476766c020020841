"""N LoRA adapters served over one base (one engine, the adapters' rows decoded in the same batch) against N
deployments of the merged models (one engine each), on the serving engine itself (no HTTP).

    .venv/bin/python bench/bench_adapters.py [--preset gpt2] [--adapters 4] [--rank 8] [--new-tokens 32] [--rounds 3]

Random weights (speed and memory do not depend on them); each adapter adapts every target layer. Each way runs in a
process of its own, so its memory is its own: the resident memory it adds once its engines are built and have
served (weights, their packed copies, KV caches, adapters), and the decode rate of N greedy streams, one per
adapter or per merged deployment, all started at once (median of the rounds).
"""

import argparse
import copy
import json
import multiprocessing
import os
import resource
import statistics
import threading
import time

import torch

from model import GPT, GPTConfig, LoRAConfig, SamplingParams, apply_lora, gpt2_tokenizer, lora_state_dict, merge_lora
from model.lora import Adapter
from serving.engine import Engine, Request


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def random_adapters(base: GPT, count: int, rank: int) -> list[tuple[Adapter, GPT]]:
    """count adapters over base, each with base merged with it."""
    made = []
    for seed in range(count):
        torch.manual_seed(seed)
        adapted, config = copy.deepcopy(base), LoRAConfig(rank=rank)
        apply_lora(adapted, config)
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if name.endswith("lora_b"):
                    param.normal_(0, 0.02)
        adapter = Adapter(config, {k: v.clone() for k, v in lora_state_dict(adapted).items()}, {})
        made.append((adapter, merge_lora(adapted).eval()))
    return made


def decode(streams: list[tuple[Engine, str | None]], prompt: list[int], new_tokens: int) -> float:
    """Seconds until every (engine, adapter) stream has generated new_tokens greedy tokens."""
    remaining, done = [len(streams)], threading.Event()

    def on_event(event) -> None:
        if isinstance(event, Exception) or event.finish_reason is not None:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    started = time.perf_counter()
    for engine, adapter in streams:
        engine.submit(Request(prompt, new_tokens, SamplingParams(temperature=0.0), on_event, adapter=adapter))
    done.wait()
    return time.perf_counter() - started


def measure(way: str, args, results) -> None:
    torch.set_num_threads(args.threads)
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    before = resident_bytes()
    base = GPT(GPTConfig.preset(args.preset)).eval()
    made = random_adapters(base, args.adapters, args.rank)
    if way == "adapters":
        adapters = {f"a{i}": adapter for i, (adapter, _) in enumerate(made)}
        del made
        engines = [Engine(base, tokenizer, max_batch=args.adapters, max_queue=args.adapters,
                          adapters=adapters).start()]
        streams = [(engines[0], name) for name in adapters]
    else:
        merged = [model for _, model in made]
        del made, base
        engines = [Engine(model, tokenizer, max_batch=args.adapters, max_queue=args.adapters).start()
                   for model in merged]
        streams = [(engine, None) for engine in engines]
    prompt = tokenizer.encode("The adapters of a team share one base model")
    try:
        decode(streams, prompt, 2)  # warm-up
        times = [decode(streams, prompt, args.new_tokens) for _ in range(args.rounds)]
        held = resident_bytes() - before
    finally:
        for engine in engines:
            engine.stop()
    results.put({"way": way, "seconds": statistics.median(times), "bytes": held,
                 "tokens": len(streams) * args.new_tokens})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")  # each way's memory in a process of its own
    measured = {}
    for way in ("adapters", "merged"):
        results = context.Queue()
        process = context.Process(target=measure, args=(way, args, results))
        process.start()
        measured[way] = results.get()
        process.join()
    print(f"{args.adapters} adapters of rank {args.rank} over `{args.preset}`, {args.new_tokens} greedy tokens per "
          f"stream, one stream per adapter, median of {args.rounds} rounds")
    for way, label in (("adapters", "one base, adapters per row"), ("merged", f"{args.adapters} merged deployments")):
        m = measured[way]
        print(f"  {label}: {m['tokens'] / m['seconds']:.1f} tokens/s, {m['bytes'] / 2**20:.0f} MiB resident")
    adapters, merged = measured["adapters"], measured["merged"]
    print(f"  tokens/s adapters / merged: {merged['seconds'] / adapters['seconds']:.2f}x; "
          f"memory merged / adapters: {merged['bytes'] / adapters['bytes']:.2f}x")
    print(json.dumps(measured))


if __name__ == "__main__":
    main()
