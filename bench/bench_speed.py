"""Training and decoding speed of our GPT against transformers' GPT2LMHeadModel (sdpa), same config, same run.

    .venv/bin/python bench/bench_speed.py [--preset small] [--threads 2]

Prints tokens/s of both, their ratio, and the fraction of this machine's ceilings (fp32 matmul FLOP/s for
training, memory bandwidth for batch-1 decode) measured in the same process.
"""

import argparse
import time

import torch
import transformers

from model import GPT, GPTConfig
from model.generate import generate


def timed(fn, repeats: int) -> float:
    """Best wall time of fn over repeats, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops_per_s(n_embd: int) -> float:
    a, b = torch.randn(1024, n_embd), torch.randn(n_embd, 4 * n_embd)
    seconds = timed(lambda: [a @ b for _ in range(20)], 3)
    return 20 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / seconds


def memory_bytes_per_s() -> float:
    big = torch.randn(64 * 1024 * 1024 // 4 * 4)  # 256 MB, far beyond the caches
    seconds = timed(lambda: big.sum(), 5)
    return big.numel() * 4 / seconds


def reference_model(config: GPTConfig) -> transformers.GPT2LMHeadModel:
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(hf_config)


def train_tokens_per_s(model, batch, steps: int, ours: bool) -> float:
    x, y = batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        # transformers shifts the labels itself
        loss = model(x, y)[1] if ours else model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return x.numel() / timed(step, steps)


def decode_tokens_per_s(run, n_new: int) -> float:
    return n_new / timed(run, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPTConfig.preset(args.preset)
    ours, ref = GPT(config), reference_model(config)
    print(f"config {args.preset}: {config}, {ours.num_parameters() / 1e6:.1f}M parameters, "
          f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}")

    flops = matmul_flops_per_s(config.n_embd)
    bandwidth = memory_bytes_per_s()
    n_matmul_params = ours.num_parameters() - config.context_length * config.n_embd
    flops_per_token = 6 * n_matmul_params + 12 * config.n_layer * config.context_length * config.n_embd
    train_ceiling = flops / flops_per_token
    decode_ceiling = bandwidth / (ours.num_parameters() * 4)
    print(f"machine: fp32 matmul {flops / 1e9:.0f} GFLOP/s -> training ceiling {train_ceiling:.0f} tokens/s; "
          f"memory {bandwidth / 1e9:.1f} GB/s -> batch-1 decode ceiling {decode_ceiling:.0f} tokens/s")

    x = torch.randint(0, config.vocab_size, (args.batch_size, config.context_length))
    batch = (x, torch.roll(x, -1, dims=1))
    train_ref = train_tokens_per_s(ref, batch, args.train_steps, ours=False)
    train_ours = train_tokens_per_s(ours, batch, args.train_steps, ours=True)
    print(f"train  (batch {args.batch_size} x {config.context_length}): ours {train_ours:7.1f} tokens/s, "
          f"reference {train_ref:7.1f} tokens/s, ratio {train_ours / train_ref:.2f}x, "
          f"ours at {train_ours / train_ceiling:.0%} of the ceiling")

    ours.eval().use_decode_layout()  # what the serving engine does with a loaded checkpoint
    ref.eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens
    ref_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        ref_cached = decode_tokens_per_s(lambda: ref.generate(prompt, use_cache=True, **ref_kwargs), n)
    ours_cached = decode_tokens_per_s(lambda: generate(ours, prompt, n), n)
    ours_uncached = decode_tokens_per_s(lambda: generate(ours, prompt, n, use_cache=False), n)
    print(f"decode (batch 1, {args.prompt_tokens}-token prompt, {n} new): ours {ours_cached:6.1f} tokens/s "
          f"(uncached {ours_uncached:5.1f}), reference {ref_cached:6.1f} tokens/s; "
          f"ours/reference {ours_cached / ref_cached:.2f}x, "
          f"cached/uncached {ours_cached / ours_uncached:.2f}x, "
          f"ours at {ours_cached / decode_ceiling:.0%} of the ceiling")


if __name__ == "__main__":
    main()
