"""Tiny Shakespeare at nanoGPT's CPU recipe budget, through the service: GPT-2's recipe against the modern one.

    TIKTOKEN_CACHE_DIR=/work/shared/tiktoken_cache .venv/bin/python bench/bench_recipes.py [--nanogpt DIR]

The budget is nanoGPT's README recipe for a CPU (config/train_shakespeare_char.py with --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --dropout=0.0): 2000 steps of 12 windows
of 64 bytes, 4 layers 128 wide, the last 10% of the text held out. Tokens are bytes: a byte-level BPE of 257
tokens (the 256 bytes and <|endoftext|>, no merges) that the job trains on its corpus. Tiny Shakespeare is ASCII,
so nanoGPT's characters are these bytes and its nats per character are nats per byte.

Everything runs through the service (`scratchllm up`, embedded: SQLite, the filesystem broker, one worker): the
first 90% and the last 10% of the text are uploaded as two corpora, each recipe is a pretrain job on the first
with the second as its validation corpus, and its last checkpoint is scored by an evaluation job on the held-out
corpus in windows of 64 with stride 64 (each byte scored once, with 0 to 63 bytes of context, as nanoGPT's
estimate_loss scores its windows). The jobs run one after another on the same worker; a recipe's wall time is
its job's, from start to finish. The recipes are interleaved over --rounds rounds and the medians reported.

- gpt2: ScratchLLM's GPT-2 preset (learned positions, LayerNorm, GELU, a tied head) with AdamW and nanoGPT's
  hyperparameters for this run (lr 1e-3 to 1e-4 by cosine after 100 warmup steps, weight decay 0.1; Adam's
  beta2 is the service's 0.95, not nanoGPT's 0.99).
- modern: the Llama preset of the same size (`llama-mini`: rotary positions, RMSNorm, a SwiGLU MLP, grouped-query
  attention with 2 key/value heads for 4 query heads, no biases, an untied head), with the same optimizer and
  schedule.
- modern+muon: the same with Muon for the blocks' matrices (lr 0.02) and AdamW for the rest. Muon learns more
  per token, but its Newton-Schulz iterations cost about as much as the forward and backward passes of these
  768-token steps on a CPU, so it does not fit the wall-time budget here; on a GPU, with larger batches, it does.

With --nanogpt DIR (a checkout of https://github.com/karpathy/nanoGPT) its own train.py also runs the recipe on
the same split as a character-level dataset (its data/shakespeare_char/prepare.py, without the download), and its
last validation loss (--eval_iters=200 random windows) stands beside ours.
"""

import argparse
import math
import os
import pickle
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
from common import DATA_DIR

STEPS, BATCH, WINDOW = 2000, 12, 64
MODEL = {"preset": "mini", "context_length": WINDOW, "dropout": 0.0}
GPT2_HYPERPARAMETERS = {"learning_rate": 1e-3, "min_learning_rate": 1e-4, "warmup_steps": 100}
RECIPES = {
    "gpt2": {"model": MODEL, "hyperparameters": GPT2_HYPERPARAMETERS},
    "modern": {"model": {**MODEL, "preset": "llama-mini"}, "hyperparameters": GPT2_HYPERPARAMETERS},
    "modern+muon": {"model": {**MODEL, "preset": "llama-mini"}, "hyperparameters": {
        **GPT2_HYPERPARAMETERS, "optimizer": "muon", "muon_learning_rate": 0.02}},
}
NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=200",
                "--log_interval=100", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


class Service:
    """`scratchllm up` on a fresh data folder, and the calls the benchmark makes to it."""

    def __init__(self, threads: int):
        self.data = Path(tempfile.mkdtemp(prefix="scratchllm-bench-"))
        port = free_port()
        env = {**os.environ, "SCRATCHLLM_DATA_DIR": str(self.data), "SCRATCHLLM_API_KEYS_REQUIRED": "false",
               "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen([sys.executable, "-m", "scratchllm", "up", "--port", str(port)], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
        while True:
            try:
                if self.http.get("/livez").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)

    def call(self, method: str, path: str, **kwargs) -> dict:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    def upload(self, name: str, text: str) -> str:
        return self.call("POST", "/v1/corpora", data={"kind": "text"},
                         files={"file": (name, text.encode("utf-8"), "text/plain")})["id"]

    def finished(self, job_id: str) -> dict:
        while (job := self.call("GET", f"/v1/jobs/{job_id}"))["status"] in ("queued", "running"):
            time.sleep(2)
        if job["status"] != "succeeded":
            raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
        return job

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.http.close()
        shutil.rmtree(self.data, ignore_errors=True)


def train_and_score(service: Service, name: str, train_id: str, held_out_id: str) -> dict:
    recipe = RECIPES[name]
    job = service.call("POST", "/v1/jobs", json={
        "type": "pretrain", "name": name, "corpus_id": train_id, "validation_corpus_id": held_out_id,
        "tokenizer": {"type": "bpe", "vocab_size": 257}, "model": recipe["model"], "seed": 1,
        "hyperparameters": {"max_steps": STEPS, "batch_size": BATCH, "block_size": WINDOW, "eval_interval": 0,
                            "checkpoint_interval": 0, **recipe["hyperparameters"]}})
    job = service.finished(job["id"])
    checkpoints = service.call("GET", "/v1/checkpoints", params={"job_id": job["id"]})["data"]
    checkpoint = max(checkpoints, key=lambda c: c["step"])
    evaluation = service.call("POST", "/v1/evaluations", json={
        "checkpoint_id": checkpoint["id"], "corpus_id": held_out_id, "block_size": WINDOW, "stride": WINDOW,
        "batch_size": 64})
    service.finished(evaluation["job_id"])
    metrics = service.call("GET", f"/v1/evaluations/{evaluation['id']}")["metrics"]
    seconds = seconds_between(job["started_at"], job["finished_at"])
    print(f"  {name}: {metrics['bits_per_byte']:.4f} bits/byte ({metrics['loss']:.4f} nats) on the held-out "
          f"text, trained in {seconds:.1f} s ({job['progress']['tokens_per_s']:.0f} tokens/s)", flush=True)
    return {"bits_per_byte": metrics["bits_per_byte"], "seconds": seconds}


def run_nanogpt(checkout: Path, text: str) -> dict:
    """nanoGPT's train.py on a copy of its checkout, with shakespeare_char prepared from our copy of the text."""
    with tempfile.TemporaryDirectory(prefix="nanogpt-") as work:
        work = Path(work)
        shutil.copytree(checkout, work, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git"))
        data = work / "data" / "shakespeare_char"
        chars = sorted(set(text))
        stoi = {c: i for i, c in enumerate(chars)}
        split = int(len(text) * 0.9)
        for file, part in (("train.bin", text[:split]), ("val.bin", text[split:])):
            np.array([stoi[c] for c in part], dtype=np.uint16).tofile(data / file)
        with open(data / "meta.pkl", "wb") as f:
            pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "train.py", *NANOGPT_ARGS], cwd=work, capture_output=True, text=True,
                             check=True).stdout
        seconds = time.perf_counter() - start
    val_loss = float(re.findall(r"step 2000: train loss [\d.]+, val loss ([\d.]+)", out)[-1])
    bits = val_loss / math.log(2)
    print(f"  nanoGPT: {bits:.4f} bits/byte ({val_loss:.4f} nats) on 200 held-out windows, {seconds:.1f} s",
          flush=True)
    return {"bits_per_byte": bits, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA_DIR / "tinyshakespeare.txt"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT: run its train.py too")
    args = parser.parse_args()
    text = Path(args.data).read_text(encoding="utf-8")
    split = int(len(text) * 0.9)

    results: dict[str, list[dict]] = {name: [] for name in RECIPES}
    service = Service(args.threads)
    try:
        train_id = service.upload("shakespeare-train.txt", text[:split])
        held_out_id = service.upload("shakespeare-held-out.txt", text[split:])
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}", flush=True)
            for name in RECIPES:
                results[name].append(train_and_score(service, name, train_id, held_out_id))
    finally:
        service.close()
    if args.nanogpt:
        results["nanoGPT"] = [run_nanogpt(args.nanogpt, text)]

    medians = {name: {key: statistics.median(r[key] for r in runs) for key in ("bits_per_byte", "seconds")}
               for name, runs in results.items()}
    gpt2, modern = medians["gpt2"], medians["modern"]
    print("\n| recipe | bits/byte | against gpt2 | wall time | against gpt2 |\n| --- | --- | --- | --- | --- |")
    for name, m in medians.items():
        print(f"| {name} | {m['bits_per_byte']:.4f} | {m['bits_per_byte'] / gpt2['bits_per_byte'] - 1:+.1%} | "
              f"{m['seconds']:.0f} s | {m['seconds'] / gpt2['seconds']:.2f}x |")
    fewer = 1 - modern["bits_per_byte"] / gpt2["bits_per_byte"]
    slower = modern["seconds"] / gpt2["seconds"]
    print(f"\nmodern against gpt2: {fewer:.1%} fewer bits per byte (target >= 7%), {slower:.2f}x its wall time "
          f"(target <= 1.2x): {'targets met' if fewer >= 0.07 and slower <= 1.2 else 'TARGETS NOT MET'}")


if __name__ == "__main__":
    main()
