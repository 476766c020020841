"""Training and decoding speed of our GPT against transformers' GPT2LMHeadModel (sdpa), same config, same run.

    .venv/bin/python bench/bench_speed.py [--preset small] [--threads 2] [--compile]

Prints tokens/s of both, their ratio, and the fraction of this machine's ceilings (fp32 matmul FLOP/s for
training, memory bandwidth for batch-1 decode) measured in the same process. Ours and the reference are
timed in alternation, round after round, and each side's median is kept, so drift in the machine's speed
falls on both alike.
"""

import argparse
import statistics
import time

import torch
import transformers

from model import GPT, GPTConfig
from model.generate import generate
from model.trainer import TrainConfig, make_optimizer


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict, rounds: int) -> dict[str, float]:
    """Median wall time of each function, run in turns after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def matmul_flops_per_s(n_embd: int) -> float:
    a, b = torch.randn(1024, n_embd), torch.randn(n_embd, 4 * n_embd)
    best = alternate({"mm": lambda: [a @ b for _ in range(20)]}, 5)["mm"]
    return 20 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / best


def memory_bytes_per_s() -> float:
    big = torch.randn(64 * 1024 * 1024)  # 256 MB, far beyond the caches
    return big.numel() * 4 / alternate({"sum": big.sum}, 5)["sum"]


def reference_model(config: GPTConfig) -> transformers.GPT2LMHeadModel:
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(hf_config)


def train_step(model, batch, ours: bool, compile_model: bool = False):
    """One optimizer step as each side's trainer takes it: ours with the Trainer's AdamW (fused),
    the reference with torch's default AdamW, as transformers' Trainer uses it."""
    x, y = batch
    if ours:
        optimizer = make_optimizer(model, TrainConfig(learning_rate=1e-4), torch.device("cpu"))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()
    forward = torch.compile(model) if compile_model else model

    def step():
        # transformers shifts the labels itself
        loss = forward(x, y)[1] if ours else model(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--compile", action="store_true",
                        help="also measure our training step under torch.compile (TrainConfig.compile)")
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
    steps = {"reference": train_step(ref, batch, ours=False), "ours": train_step(ours, batch, ours=True)}
    if args.compile:
        steps["ours compiled"] = train_step(GPT(config), batch, ours=True, compile_model=True)
    train = {name: x.numel() / s for name, s in alternate(steps, args.rounds).items()}
    for name, rate in train.items():
        print(f"train  (batch {args.batch_size} x {config.context_length}) {name:13s}: {rate:7.1f} tokens/s, "
              f"{rate / train['reference']:.2f}x the reference, {rate / train_ceiling:.0%} of the ceiling")

    ours.eval()
    ref.eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_tokens))
    n = args.new_tokens
    ref_kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    def ref_generate():
        with torch.inference_mode():
            ref.generate(prompt, use_cache=True, **ref_kwargs)

    decode = {name: n / s for name, s in alternate({
        "reference": ref_generate,
        "ours": lambda: generate(ours, prompt, n),
        "ours uncached": lambda: generate(ours, prompt, n, use_cache=False),
    }, max(3, args.rounds // 2)).items()}
    for name, rate in decode.items():
        print(f"decode (batch 1, {args.prompt_tokens}-token prompt, {n} new) {name:13s}: "
              f"{rate:6.1f} tokens/s, "
              f"{rate / decode['reference']:.2f}x the reference, {rate / decode_ceiling:.0%} of the ceiling")
    print(f"decode: ours cached / ours uncached = {decode['ours'] / decode['ours uncached']:.2f}x")


if __name__ == "__main__":
    main()
