"""What a GPU does for ScratchLLM, measured in one run (issue 12): correctness, training throughput, serving.

    python bench/gpu_check.py --out DIR [--quick]

`bench/gpu_check.sh` runs it on a bare GPU machine (it installs the service's wheels first); every figure
goes to DIR/results.json as soon as it is measured, so a run cut short keeps what it had. `--quick` runs
every part with tiny sizes, on the CPU when there is no GPU: a check of the script itself.

1. correctness: the same short training run on the CPU in float32 and on the GPU in bfloat16 (final losses
   within 3%); a deployment on `auto` (cuda:0 bfloat16) streams through the API; data-parallel training on
   every GPU when there are several (the same curve as one GPU).
2. training throughput of `gpt2` (124M) at context 1024: ScratchLLM's Trainer against transformers' GPT-2 in a
   nanoGPT-style loop, both with bfloat16 autocast, fused AdamW, torch.compile and flash attention (SDPA).
   Tokens/s and MFU (nanoGPT's FLOPs per token over the GPU's dense bfloat16 peak).
3. serving a `gpt2` deployment: batch-1 decode tokens/s and the aggregate tokens/s of 32 streams through
   HTTP, against transformers' generate (batch 1, greedy, with its KV cache).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench's own modules
from bench_serving import PROMPT, concurrent  # noqa: E402
from common import register_checkpoint  # noqa: E402

from model import (  # noqa: E402
    GPT,
    Callback,
    GPTConfig,
    PretrainObjective,
    TrainConfig,
    Trainer,
    gpt2_tokenizer,
    save_checkpoint,
)

PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, per the vendor's data sheets
TARGETS = {"training_vs_reference": 1.1, "decode_vs_transformers": 3.0, "streams_32_vs_1": 10.0}


class Results:
    """results.json in the output folder, rewritten after every figure."""

    def __init__(self, out: Path):
        self.path, self.values = out / "results.json", {}

    def __setitem__(self, key: str, value) -> None:
        self.values[key] = value
        self.path.write_text(json.dumps(self.values, indent=2))
        print(f"{key}: {json.dumps(value)}", flush=True)


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def corpus_tokens(n: int) -> np.ndarray:
    data = Path(os.environ.get("SCRATCHLLM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    text = (data / "tinyshakespeare.txt").read_text(encoding="utf-8")
    return np.asarray(gpt2_tokenizer().encode(text)[:n], dtype=np.uint16)


# -- 1. correctness --------------------------------------------------------------------------------------------

def short_run(where: str, steps: int) -> list[float]:
    torch.manual_seed(0)
    tokens = corpus_tokens(60_000)
    model = GPT(GPTConfig.preset("nano", context_length=128))
    objective = PretrainObjective(tokens[:55_000], tokens[55_000:], block_size=128, batch_size=16, seed=1)
    config = TrainConfig(max_steps=steps, learning_rate=3e-3, warmup_steps=10, eval_interval=0, eval_batches=2,
                         checkpoint_interval=0, device=where)
    with tempfile.TemporaryDirectory() as out:
        return Trainer(model, objective, config, gpt2_tokenizer(), out, Callback(), seed=1).train().train_losses


def check_training_dtypes(results: Results, quick: bool) -> None:
    steps = 20 if quick else 150
    cpu = short_run("cpu", steps)
    gpu = short_run(str(device()), steps)
    difference = abs(gpu[-1] - cpu[-1]) / cpu[-1]
    results["correctness_training"] = {"steps": steps, "cpu_float32_final_loss": cpu[-1],
                                       f"{device().type}_final_loss": gpu[-1], "relative_difference": difference,
                                       "within_3_percent": difference < 0.03}


# -- 2. training throughput ------------------------------------------------------------------------------------

class StepTimes(Callback):
    """When each step ended (its loss known), and how many tokens it took."""

    def __init__(self):
        self.ends: list[float] = []
        self.tokens_per_step = 0

    def on_progress(self, progress) -> None:
        self.ends.append(time.perf_counter())
        self.tokens_per_step = progress.tokens_seen // progress.step


def trainer_rate(config: GPTConfig, batch: int, steps: int) -> float:
    """Tokens/s of ScratchLLM's Trainer on random tokens, after the compile's warm-up steps."""
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, 2_000_000).astype(np.uint16)
    objective = PretrainObjective(tokens, tokens[:100_000], block_size=config.context_length, batch_size=batch,
                                  seed=1)
    train = TrainConfig(max_steps=steps, eval_interval=0, eval_batches=1, checkpoint_interval=0, compile=True,
                        device=str(device()))
    times = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        Trainer(GPT(config), objective, train, gpt2_tokenizer(), out, times, seed=1).train()
    # the second half of the steps, but the last, which also evaluates
    return times.tokens_per_step / float(np.median(np.diff(times.ends)[steps // 2:-1]))


def transformers_gpt2(config: GPTConfig):
    """transformers' GPT2LMHeadModel of the same shape, attending with SDPA (flash attention on a GPU)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    hf_config = GPT2Config(n_positions=config.context_length, n_embd=config.n_embd, n_layer=config.n_layer,
                           n_head=config.n_head, vocab_size=config.vocab_size)
    return AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa").to(device())


def reference_rate(config: GPTConfig, batch: int, steps: int) -> float:
    """Tokens/s of transformers' GPT-2 in a nanoGPT-style loop: the same optimizer, precision and compile."""
    model = transformers_gpt2(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    forward = torch.compile(model)
    x = torch.randint(0, config.vocab_size, (batch, config.context_length), device=device())
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autocast(device().type, dtype=torch.bfloat16):
            loss = forward(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # as the Trainer does: the step is over when its loss is known
        timings.append(time.perf_counter() - started)
    return batch * config.context_length / float(np.median(timings[steps // 2:]))


def mfu(config: GPTConfig, tokens_per_s: float) -> float | None:
    """nanoGPT's estimate: 6N + 12 L H Q T FLOPs per token, over the GPU's dense bfloat16 peak."""
    if device().type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    n_params = GPT(config).num_parameters() - config.context_length * config.n_embd
    per_token = 6 * n_params + 12 * config.n_layer * config.n_head * config.head_dim * config.context_length
    return per_token * tokens_per_s / peak if peak else None


def check_training_throughput(results: Results, quick: bool) -> None:
    config = GPTConfig.preset("nano", context_length=128) if quick else GPTConfig.preset("gpt2")
    batch, steps = (4, 12) if quick else (16, 40)
    ours, theirs = trainer_rate(config, batch, steps), reference_rate(config, batch, steps)
    results["training_throughput"] = {
        "model": "nano" if quick else "gpt2", "batch": batch, "context": config.context_length,
        "scratchllm_tokens_per_s": ours, "transformers_tokens_per_s": theirs, "ratio": ours / theirs,
        "target": TARGETS["training_vs_reference"], "scratchllm_mfu": mfu(config, ours),
        "transformers_mfu": mfu(config, theirs)}


# -- 3. serving ------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def transformers_decode_rate(config: GPTConfig, tokens: int) -> float:
    dtype = torch.bfloat16 if device().type == "cuda" else torch.float32
    model = transformers_gpt2(config).to(dtype).eval()
    prompt = torch.tensor([gpt2_tokenizer().encode(PROMPT)], device=device())
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           attention_mask=torch.ones_like(prompt), pad_token_id=50256)
        rates.append(tokens / (time.perf_counter() - started))
    return float(np.median(rates))


def check_serving(results: Results, quick: bool) -> None:
    import httpx

    config = GPTConfig.preset("nano", context_length=512) if quick else GPTConfig.preset("gpt2")
    tokens, streams = (32, 4) if quick else (256, 32)
    data = Path(tempfile.mkdtemp(prefix="scratchllm-gpu-"))
    env = {**os.environ, "SCRATCHLLM_DATA_DIR": str(data), "SCRATCHLLM_SERVING_MAX_BATCH": str(streams),
           "SCRATCHLLM_API_KEYS_REQUIRED": "false", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    subprocess.run([sys.executable, "-m", "scratchllm", "db", "upgrade"], env=env, check=True, capture_output=True)
    torch.manual_seed(0)
    directory = save_checkpoint(data / "checkpoints" / "gpu-check", GPT(config), gpt2_tokenizer())
    checkpoint_id = register_checkpoint(data, f"sqlite:///{data / 'scratchllm.db'}", directory)
    port = free_port()
    with open(data / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "scratchllm", "api", "--port", str(port)], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/livez", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and server.poll() is None, (data / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        created = httpx.post(f"{url}/v1/deployments", json={"name": "gpt2", "checkpoint_id": checkpoint_id}).json()
        while (state := httpx.get(f"{url}/v1/deployments/gpt2").json())["state"] == "loading":
            assert time.monotonic() < deadline, state
            time.sleep(0.5)
        info = httpx.get(f"{url}/info").json()
        results["serving_deployment"] = {"asked": [created["device"], created["dtype"]],
                                         "served": [state["served_device"], state["served_dtype"]],
                                         "info": [info["model_device_type"], info["model_dtype"]],
                                         "state": state["state"], "error": state["error"]}
        concurrent(port, 1, 8)  # warm-up
        one = float(np.median([concurrent(port, 1, tokens)[0] for _ in range(3)]))
        many, _, _, errors = concurrent(port, streams, tokens)
        reference = transformers_decode_rate(config, tokens)
        results["serving_throughput"] = {
            "model": "nano" if quick else "gpt2", "new_tokens": tokens, "batch_1_tokens_per_s": one,
            "transformers_generate_tokens_per_s": reference, "batch_1_vs_transformers": one / reference,
            "target_vs_transformers": TARGETS["decode_vs_transformers"], f"streams_{streams}_tokens_per_s": many,
            f"streams_{streams}_vs_1": many / one, "target_streams_vs_1": TARGETS["streams_32_vs_1"],
            "stream_errors": errors}
    finally:
        server.terminate()
        server.wait(30)


# -- DDP on every GPU --------------------------------------------------------------------------------------------

def check_data_parallel(results: Results, quick: bool) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        results["data_parallel"] = {"skipped": f"{gpus} GPU(s): the two-GPU run needs at least 2"}
        return
    test = Path(__file__).resolve().parents[1] / "tests" / "integration" / "test_parallel_training.py"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test), "-k",
                          "same_global_batch"], capture_output=True, text=True, cwd=test.parents[2],
                         env={**os.environ, "SCRATCHLLM_PARALLEL_TEST_DEVICE": "cuda"})
    results["data_parallel"] = {"gpus": gpus, "passed": run.returncode == 0, "tail": run.stdout[-1500:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the script, not the GPU")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = Results(args.out)
    results["environment"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name()
                              if torch.cuda.is_available() else "cpu", "gpus": torch.cuda.device_count()}
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for check in (check_training_dtypes, check_serving, check_training_throughput, check_data_parallel):
        started = time.perf_counter()
        try:
            check(results, args.quick)
        except Exception:  # the other checks still run; the failure is a result too
            results[f"{check.__name__}_error"] = traceback.format_exc()[-3000:]
        print(f"{check.__name__}: {time.perf_counter() - started:.1f} s", flush=True)


if __name__ == "__main__":
    main()
