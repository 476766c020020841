"""Serving under load: a `small` checkpoint behind `scratchllm api`, streamed to concurrent clients over HTTP+SSE.

    .venv/bin/python bench/bench_serving.py [--tokens 128] [--rounds 5] [--soak-seconds 120]

Prints the engine's raw single-sequence decode rate (no HTTP, in a process of its own), the single-stream
rate through HTTP+SSE and its fraction of the raw rate, the aggregate rate of 8 concurrent streams and its
multiple of the single stream (the three measured in interleaved rounds, medians), p50/p95 time to first
token and inter-token latency, then a soak of 32 clients with random parameters and random disconnects:
requests by status, 5xx, sequences left running, server memory.
"""

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
from common import register_checkpoint

from model import GPT, GPTConfig, SamplingParams, gpt2_tokenizer, load_checkpoint, save_checkpoint
from serving.engine import Engine, Request

PROMPT = "The history of the world is the history of"


def engine_rate(checkpoint: Path, tokens: int) -> float:
    """The engine's single-sequence decode rate, measured as the server runs it: in a process of its own
    whose torch work is done by a loader thread and then the engine's thread only.

    Torch work left on another live thread (this bench builds the model on its main thread) keeps a second
    OpenMP thread team alive, and with more OpenMP threads than cores libgomp stops spinning between
    parallel regions: the engine then decodes up to a third slower than in the server.
    """
    result = subprocess.run([sys.executable, __file__, "--engine-rate-of", str(checkpoint), "--tokens", str(tokens)],
                            capture_output=True, text=True, check=True)
    return float(result.stdout.split()[-1])


def print_engine_rate(checkpoint: Path, tokens: int) -> None:
    def load() -> None:  # on a thread of its own, as the server loads a deployment
        model, tokenizer, _ = load_checkpoint(checkpoint)
        loaded.append((Engine(model, tokenizer, max_batch=8).start(), tokenizer))

    loaded = []
    loader = threading.Thread(target=load)
    loader.start()
    loader.join()
    engine, tokenizer = loaded[0]
    done = threading.Event()
    prompt = tokenizer.encode(PROMPT)
    rates = []
    for _ in range(3):
        done.clear()
        start = time.perf_counter()
        engine.submit(Request(prompt, tokens, SamplingParams(), lambda e: e.finish_reason and done.set()))
        done.wait()
        rates.append(tokens / (time.perf_counter() - start))
    engine.stop()
    print(statistics.median(rates))


def stream(port: int, tokens: int, parameters: dict | None = None, disconnect_after: int | None = None):
    """One streamed request: (status, arrival time of each token's event from the request's start).

    A minimal HTTP/1.1 reader on a socket rather than httpx: the clients share the server's 2 cores, and
    httpx spent 0.3-0.5 ms of CPU per streamed token, this reader 0.04-0.06 ms (a decode step is ~6 ms).
    """
    body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": tokens, **(parameters or {})}}).encode()
    request = (f"POST /generate_stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    start = time.perf_counter()
    times: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=120) as connection:
        connection.sendall(request)
        head, status, tail = b"", None, b""
        while chunk := connection.recv(65536):
            if status is None:
                head += chunk
                if b"\r\n\r\n" not in head:
                    continue
                head, _, chunk = head.partition(b"\r\n\r\n")
                status = int(head.split()[1])
                if status != 200:
                    break
            events = (tail + chunk).count(b"\n\n")  # an SSE event ends with a blank line
            tail = chunk[-1:]
            if events:
                times += [time.perf_counter() - start] * events
                if disconnect_after is not None and len(times) >= disconnect_after:
                    break  # leaving the block closes the connection mid-stream
    return (status or -1), times


def concurrent(port: int, n: int, tokens: int) -> tuple[float, list[float], list[float], int]:
    results = [None] * n

    def run(i):
        results[i] = stream(port, tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    ttft = [times[0] for _, times in results if times]
    itl = [b - a for _, times in results for a, b in zip(times, times[1:], strict=False)]
    errors = sum(status != 200 for status, _ in results)
    return sum(len(times) for _, times in results) / elapsed, ttft, itl, errors


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)
    return (f"p50 {values[len(values) // 2] * 1000:.0f} ms, "
            f"p95 {values[min(len(values) - 1, int(len(values) * 0.95))] * 1000:.0f} ms")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def soak(port: int, seconds: float, clients: int, tokens: int, server_pid: int) -> tuple[dict[int, int], list[float]]:
    """Requests by status (-1: a client-side error) and the server's memory sampled every 5 s."""
    statuses: dict[int, int] = {}
    memory: list[float] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def sample_memory():
        while time.monotonic() < deadline:
            memory.append(rss_mb(server_pid))
            time.sleep(5)

    def run(seed: int):
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            parameters = {"do_sample": rng.random() < 0.7, "temperature": rng.uniform(0.5, 1.5),
                          "top_k": rng.choice([None, 10, 50]), "top_p": rng.choice([None, 0.9]),
                          "repetition_penalty": rng.choice([None, 1.2]), "stop": rng.choice([[], ["."]]),
                          "seed": rng.randrange(1 << 30)}
            parameters = {k: v for k, v in parameters.items() if v is not None}
            disconnect = rng.randrange(1, 20) if rng.random() < 0.3 else None
            try:
                status, _ = stream(port, rng.randrange(4, tokens), parameters, disconnect)
            except OSError:  # refused, reset or timed out
                status = -1
            with lock:
                statuses[status] = statuses.get(status, 0) + 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    threads.append(threading.Thread(target=sample_memory))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--soak-seconds", type=float, default=120)
    parser.add_argument("--soak-clients", type=int, default=32)
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of 1 and 8 streams")
    parser.add_argument("--engine-rate-of", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.engine_rate_of:
        print_engine_rate(args.engine_rate_of, args.tokens)
        return
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("small")).eval()
    data = Path(tempfile.mkdtemp(prefix="scratchllm-bench-"))
    env = {**os.environ, "SCRATCHLLM_DATA_DIR": str(data), "SCRATCHLLM_SERVING_MAX_BATCH": "8",
           "SCRATCHLLM_SERVING_MAX_QUEUE": "64", "SCRATCHLLM_API_KEYS_REQUIRED": "false"}  # one local user
    subprocess.run([sys.executable, "-m", "scratchllm", "db", "upgrade"], env=env, check=True, capture_output=True)
    save_checkpoint(data / "checkpoints" / "bench", model, gpt2_tokenizer())

    server_log = open(data / "server.log", "w")  # noqa: SIM115  (open while the server runs)
    server = subprocess.Popen([sys.executable, "-m", "scratchllm", "api", "--port", str(args.port)], env=env,
                              stdout=server_log, stderr=subprocess.STDOUT)
    print(f"server log: {data / 'server.log'}")
    url = f"http://127.0.0.1:{args.port}"
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            while True:
                try:
                    client.get("/livez")
                    break
                except httpx.HTTPError:
                    time.sleep(0.3)
            checkpoint_id = register_checkpoint(data, f"sqlite:///{data / 'scratchllm.db'}",
                                                data / "checkpoints" / "bench")
            client.post("/v1/deployments", json={"name": "small", "checkpoint_id": checkpoint_id})
            while client.get("/health").status_code != 200:
                time.sleep(0.3)
            stream(args.port, 8)  # warm-up
        # interleaved rounds, medians: the machine's speed drifts, and both sides of the ratio see the same drift
        raws, singles, aggregates, ttft, itl, errors = [], [], [], [], [], 0
        for _ in range(args.rounds):
            raws.append(engine_rate(data / "checkpoints" / "bench", args.tokens))
            singles.append(concurrent(args.port, 1, args.tokens)[0])
            aggregate, round_ttft, round_itl, round_errors = concurrent(args.port, 8, args.tokens)
            aggregates.append(aggregate)
            ttft, itl, errors = ttft + round_ttft, itl + round_itl, errors + round_errors
        raw, single, aggregate = statistics.median(raws), statistics.median(singles), statistics.median(aggregates)
        print(f"engine without HTTP, one sequence of {args.tokens} tokens: {raw:.1f} tokens/s; "
              f"rounds {' '.join(f'{r:.1f}' for r in raws)}")
        print(f"HTTP+SSE, one stream: {single:.1f} tokens/s = {single / raw:.0%} of the engine's raw rate "
              f"(target >= 90%); rounds {' '.join(f'{r:.1f}' for r in singles)}")
        print(f"HTTP+SSE, 8 concurrent streams: {aggregate:.1f} tokens/s in all = {aggregate / single:.2f}x one "
              f"stream (target >= 3x); rounds {' '.join(f'{r:.1f}' for r in aggregates)}; errors {errors}")
        print(f"  time to first token {percentiles(ttft)}; inter-token latency {percentiles(itl)}")
        if args.soak_seconds > 0:
            statuses, memory = soak(args.port, args.soak_seconds, args.soak_clients, args.tokens, server.pid)
            time.sleep(1)
            metrics = httpx.get(f"{url}/metrics").text
            running = [line for line in metrics.splitlines() if line.startswith("scratchllm_running_sequences{")]
            waiting = [line for line in metrics.splitlines() if line.startswith("scratchllm_queue_depth{")]
            memory_after = rss_mb(server.pid)
            server_errors = sum(n for status, n in statuses.items() if status >= 500)
            print(f"soak, {args.soak_clients} clients for {args.soak_seconds:.0f} s: requests by status "
                  f"{json.dumps(statuses)}, 5xx {server_errors}; after it {running} {waiting}")
            half = len(memory) // 2
            print(f"  server memory every 5 s (MB): {' '.join(f'{m:.0f}' for m in memory)}; {memory_after:.0f} after; "
                  f"peak of the first half {max(memory[:half]):.0f}, of the second half {max(memory[half:]):.0f}")
    finally:
        server.terminate()
        server.wait()
        server_log.close()


if __name__ == "__main__":
    main()
