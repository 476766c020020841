"""N LoRA adapters served over one base (one engine, the adapters' rows decoded in the same batch) against N
deployments of the merged models (one engine each), on the serving engine itself (no HTTP).

    .venv/bin/python bench/bench_adapters.py [--preset gpt2] [--adapters 4] [--rank 8] [--new-tokens 32] [--rounds 3]

Random weights (speed and memory do not depend on them); each adapter adapts every target layer. Each round runs
each way in a process of its own, the ways alternating, so each way's memory is its own: the resident memory it
adds once its engines are built and have served (weights, their packed copies, KV caches, adapters), and the decode
rate of N greedy streams, one per adapter or per merged deployment, all started at once (medians of the rounds);
and, for scale, the base alone serving the N streams without adapters.
"""

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import threading
import time

import torch
from torch import nn

from model import GPT, GPTConfig, LoRAConfig, SamplingParams, apply_lora, gpt2_tokenizer, merge_lora
from model.lora import LORA_TARGETS, Adapter
from serving.engine import Engine, Request


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def random_adapter(base: GPT, rank: int, seed: int) -> Adapter:
    """An adapter of every target layer of base, with random A and B."""
    generator, tensors = torch.Generator().manual_seed(seed), {}
    for name, layer in base.named_modules():
        if name.rpartition(".")[2] in LORA_TARGETS and isinstance(layer, nn.Linear):
            tensors[f"{name}.lora_a"] = torch.randn(rank, layer.in_features, generator=generator) * 0.02
            tensors[f"{name}.lora_b"] = torch.randn(layer.out_features, rank, generator=generator) * 0.02
    return Adapter(LoRAConfig(rank=rank), tensors, {})


def base_model(preset: str) -> GPT:
    torch.manual_seed(0)  # the same weights each time
    return GPT(GPTConfig.preset(preset)).eval()


def merged_model(preset: str, adapter: Adapter) -> GPT:
    """The base with adapter merged into its weights, built in place: no second copy of the base is ever held."""
    model = base_model(preset)
    apply_lora(model, adapter.config)
    missing = model.load_state_dict(adapter.tensors, strict=False).missing_keys
    assert not any(key.endswith(("lora_a", "lora_b")) for key in missing)
    return merge_lora(model).eval()


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
    shapes = base_model(args.preset)  # only for the adapters' shapes: freed before the measure starts
    adapters = {f"a{i}": random_adapter(shapes, args.rank, seed=i) for i in range(args.adapters)}
    del shapes
    before = resident_bytes()
    if way in ("adapters", "base"):
        engines = [Engine(base_model(args.preset), tokenizer, max_batch=args.adapters, max_queue=args.adapters,
                          adapters=adapters if way == "adapters" else None).start()]
        streams = [(engines[0], name if way == "adapters" else None) for name in adapters]
    else:
        engines = [Engine(merged_model(args.preset, adapter), tokenizer, max_batch=args.adapters,
                          max_queue=args.adapters).start() for adapter in adapters.values()]
        streams = [(engine, None) for engine in engines]
    prompt = tokenizer.encode("The adapters of a team share one base model")
    try:
        decode(streams, prompt, 2)  # warm-up
        seconds = decode(streams, prompt, args.new_tokens)
        held = resident_bytes() - before
    finally:
        for engine in engines:
            engine.stop()
    results.put({"seconds": seconds, "bytes": held})


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
    rounds = {"adapters": [], "merged": [], "base": []}
    for _ in range(args.rounds):
        for way, measured in rounds.items():
            results = context.Queue()
            process = context.Process(target=measure, args=(way, args, results))
            process.start()
            measured.append(results.get())
            process.join()
    tokens = args.adapters * args.new_tokens
    measured = {way: {"tokens_per_s": tokens / statistics.median(r["seconds"] for r in runs),
                      "bytes": statistics.median(r["bytes"] for r in runs)} for way, runs in rounds.items()}
    print(f"{args.adapters} adapters of rank {args.rank} over `{args.preset}`, {args.new_tokens} greedy tokens per "
          f"stream, one stream per adapter, median of {args.rounds} rounds")
    for way, label in (("adapters", "one base, adapters per row"), ("merged", f"{args.adapters} merged deployments"),
                       ("base", "the base alone, no adapter (for scale)")):
        m = measured[way]
        print(f"  {label}: {m['tokens_per_s']:.1f} tokens/s, {m['bytes'] / 2**20:.0f} MiB resident")
    adapters, merged = measured["adapters"], measured["merged"]
    print(f"  tokens/s adapters / merged: {adapters['tokens_per_s'] / merged['tokens_per_s']:.2f}x; "
          f"memory merged / adapters: {merged['bytes'] / adapters['bytes']:.2f}x; "
          f"tokens/s adapters / base alone: {adapters['tokens_per_s'] / measured['base']['tokens_per_s']:.2f}x")
    print(json.dumps(measured))


if __name__ == "__main__":
    main()
