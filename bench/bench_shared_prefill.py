"""n sequences of one prompt: prefilled once and shared (what the engine does for n and best_of) against n
separate requests, each prefilling the prompt, on the serving engine itself (no HTTP).

    .venv/bin/python bench/bench_shared_prefill.py [--prompt-tokens 900] [--new-tokens 16] [--n 4] [--rounds 5]

A GPT-2-sized model (`gpt2` preset, random weights: speed does not depend on them) behind an Engine with n slots.
Each round times both ways, interleaved; prints each way's median time until all n sequences finish, the ratio,
and the prompt prefills each way ran.
"""

import argparse
import statistics
import threading
import time

import torch

from model import GPT, GPTConfig, SamplingParams, gpt2_tokenizer
from model.generate import Decoder
from serving.engine import Engine, Request


def run(engine: Engine, prompt: list[int], n: int, new_tokens: int, shared: bool) -> float:
    """Seconds until n sampled sequences of prompt have finished."""
    remaining, done = [n], threading.Event()

    def on_event(event) -> None:
        if isinstance(event, Exception) or event.finish_reason is not None:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.set()

    started, first = time.perf_counter(), None
    for seed in range(n):
        request = Request(prompt, new_tokens, SamplingParams(temperature=1.0), on_event, seed=seed,
                          twin_of=first if shared else None)
        engine.submit(request)
        first = first or request
    done.wait()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=900)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2")).eval()
    prefills = {True: 0, False: 0}
    counting = [False]
    original = Decoder.logits

    def counted(decoder, idx, slots=None):  # a prompt chunk of more than one token is a prefill's work
        if idx.shape[1] > 1:
            prefills[counting[0]] += idx.shape[1]
        return original(decoder, idx, slots)

    Decoder.logits = counted
    engine = Engine(model, gpt2_tokenizer(), max_batch=args.n, max_queue=args.n).start()
    prompt = torch.randint(0, 50257, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    try:
        run(engine, prompt, args.n, 2, shared=True)  # warm-up
        prefills.update({True: 0, False: 0})
        times = {True: [], False: []}
        for _ in range(args.rounds):
            for shared in (True, False):
                counting[0] = shared
                times[shared].append(run(engine, prompt, args.n, args.new_tokens, shared))
    finally:
        engine.stop()
    shared, separate = statistics.median(times[True]), statistics.median(times[False])
    print(f"{args.n} sequences of a {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens each, "
          f"{args.rounds} interleaved rounds")
    print(f"  one shared prefill: {shared:.2f} s (prompt tokens prefilled per round: "
          f"{prefills[True] // args.rounds})")
    print(f"  {args.n} separate requests: {separate:.2f} s (prompt tokens prefilled per round: "
          f"{prefills[False] // args.rounds})")
    print(f"  separate / shared: {separate / shared:.2f}x")


if __name__ == "__main__":
    main()
