"""The `scratchllm` command.

    scratchllm up [--host H] [--port P] [--data-dir D]   the whole service on this machine: migrations, the API
                                                        and one worker, SQLite and no server of any kind
    scratchllm api [--host H] [--port P]     serve the API (settings from SCRATCHLLM_* variables)
    scratchllm worker                        run a training worker (Celery)
    scratchllm db upgrade                    apply the database migrations
    scratchllm keys create --name N [--scope read|train|admin]   create an API key (printed once)
    scratchllm demo [--steps N] [--text FILE] [--out DIR]

The client of a running server (SCRATCHLLM_URL and SCRATCHLLM_API_KEY, or --url and --api-key):

    scratchllm corpora upload FILE --kind text|classification|instruction    (with a progress bar)
    scratchllm corpora list
    scratchllm jobs start [--file job.yaml] [--type T] [--corpus ID] [--base CKPT] [--steps N] ... [--follow]
    scratchllm jobs follow|show|cancel JOB    scratchllm jobs list [--status S] [--type T]
    scratchllm checkpoints list [--job JOB]
    scratchllm evaluate CHECKPOINT --corpus ID [--follow]    scratchllm compare --corpus ID | --ids EVAL...
    scratchllm deploy NAME CHECKPOINT [--adapter NAME=CKPT]... [--default] [--device D] [--dtype T]
    scratchllm generate PROMPT [--deployment NAME[:ADAPTER]] [--max-tokens N] [--temperature T]
    scratchllm chat [--deployment NAME]       scratchllm classify TEXT... [--deployment NAME]

Every client command takes --json. Exit status: 0 done, 1 refused or failed (a job that failed), 3 a job cancelled.

`demo` trains a byte-level BPE tokenizer and a tiny GPT on a text (a bundled sample by default) on this
machine's CPU, saves a checkpoint, loads it back and streams a sample from it.
"""

import argparse
import contextlib
import ctypes
import logging
import os
import re
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

from core.enums import KeyScope
from scratchllm.client import add_commands as add_client_commands


def demo(args: argparse.Namespace) -> None:
    import torch

    from model import (
        GPT,
        Callback,
        GPTConfig,
        PretrainObjective,
        SamplingParams,
        TrainConfig,
        Trainer,
        load_checkpoint,
        open_tokens,
        split_tokens,
        stream_generate,
        tokenize_to_memmap,
        train_bpe,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with resources.as_file(resources.files("model") / "sample.txt") as sample:
        text_path = Path(args.text) if args.text else sample
        text = text_path.read_text(encoding="utf-8")
        started = time.perf_counter()
        tokenizer = train_bpe(text, args.vocab_size)
        print(f"tokenizer: byte-level BPE with {tokenizer.vocab_size} tokens trained on {len(text):,} "
              f"characters in {time.perf_counter() - started:.1f} s")
        tokenize_to_memmap(text_path, tokenizer, out / "tokens.bin")
    tokens = open_tokens(out / "tokens.bin")
    block = args.context
    train, val = split_tokens(tokens, 0.1, block)
    print(f"data: {len(tokens):,} tokens ({len(train):,} train, {len(val):,} validation)")

    torch.manual_seed(args.seed)
    config = GPTConfig.preset("nano", vocab_size=tokenizer.vocab_size, context_length=block, dropout=0.1)
    model = GPT(config)
    print(f"model: {model.num_parameters() / 1e6:.2f}M parameters, {config}")

    class Printer(Callback):
        def on_progress(self, progress):
            if progress.step % 50 == 0 or progress.step == progress.total_steps:
                val = f", val loss {progress.val_loss:.3f}" if progress.val_loss is not None else ""
                print(f"step {progress.step:4d}/{progress.total_steps}: train loss {progress.train_loss:.3f}"
                      f"{val}, {progress.tokens_per_s:,.0f} tokens/s, ETA {progress.eta_s:.0f} s")

        def on_sample(self, step, sample):
            print(f"  sample at step {step}: {sample!r}")

    train_config = TrainConfig(max_steps=args.steps, learning_rate=3e-3, warmup_steps=20, eval_interval=100,
                               checkpoint_interval=0,
                               eval_batches=4, sample_interval=100, sample_prompt="Alice", sample_tokens=30,
                               grad_clip=1.0)
    objective = PretrainObjective(train, val, block_size=block, batch_size=16, seed=args.seed)
    result = Trainer(model, objective, train_config, tokenizer, out / "checkpoints", Printer(),
                     seed=args.seed).train()
    print(f"checkpoint: {result.checkpoint}")

    loaded, loaded_tokenizer, meta = load_checkpoint(result.checkpoint)
    print(f"loaded step {meta['step']} (val loss {meta['metrics']['val_loss']:.3f}); streaming a sample:\n")
    prompt = loaded_tokenizer.encode("Alice")
    sys.stdout.write("Alice")
    sampling = SamplingParams(temperature=0.8, top_k=40)
    for event in stream_generate(loaded, loaded_tokenizer, prompt, 80, sampling, seed=args.seed):
        sys.stdout.write(event.text)
        sys.stdout.flush()
    print()


def _limit_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own arena and keeps what it frees there; a server
    whose request threads come and go then grows its memory for no use. Two arenas keep it steady."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX


def _refuse_open_mode_off_loopback(settings, host: str) -> None:
    from app.auth import is_loopback_host

    if not settings.api_keys_required and not is_loopback_host(host):
        sys.exit(f"scratchllm: SCRATCHLLM_API_KEYS_REQUIRED=false serves without keys, which only a loopback "
                 f"address may do, not --host {host}: require keys and create one with `scratchllm keys create`")


def api(args: argparse.Namespace) -> None:
    import uvicorn

    _limit_malloc_arenas()
    from app.main import create_app
    from core.migrate import upgrade
    from core.settings import settings_from_environment

    settings = settings_from_environment()
    _refuse_open_mode_off_loopback(settings, args.host)
    if args.migrate:
        settings.data_dir.mkdir(parents=True, exist_ok=True)  # where the embedded database goes
        upgrade(settings.sqlalchemy_url)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, limit_concurrency=settings.max_connections)


def worker(_args: argparse.Namespace) -> None:
    # SIGTERM starts Celery's soft shutdown, in which the running job checkpoints and is re-queued
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from core.queue import clear_stale_bindings
    from worker.celery_app import celery, settings

    if settings.broker_url is None:
        clear_stale_bindings(settings)
    celery.worker_main(["worker", "--pool=prefork", f"--concurrency={settings.worker_concurrency}",
                        f"--queues={settings.training_queue}",
                        f"--loglevel={settings.log_level}", "--without-gossip", "--without-mingle"])


def up(args: argparse.Namespace) -> None:
    import uvicorn

    _limit_malloc_arenas()
    from app.auth import is_loopback_host
    from app.main import create_app
    from core.migrate import upgrade
    from core.processes import start_child
    from core.settings import Settings

    if args.data_dir:
        os.environ["SCRATCHLLM_DATA_DIR"] = str(Path(args.data_dir).resolve())
    settings = Settings()
    if "api_keys_required" not in settings.model_fields_set:  # neither the environment nor .env says
        # one user on this machine needs no keys; served beyond it, keys are required
        settings = settings.model_copy(update={"api_keys_required": not is_loopback_host(args.host)})
    _refuse_open_mode_off_loopback(settings, args.host)
    os.environ["SCRATCHLLM_DATA_DIR"] = str(settings.data_dir)  # the worker sees the same folder
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.sqlalchemy_url)
    log_path = settings.data_dir / "logs" / "scratchllm.log"
    log_path.parent.mkdir(exist_ok=True)
    # the terminal gets a summary; the API's and the worker's logs (Celery's banner included) go to the file
    logging.basicConfig(filename=log_path, level=settings.log_level, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_start = log_path.stat().st_size
    with open(log_path, "ab") as log_file:
        worker_process = start_child([sys.executable, "-m", "scratchllm", "worker"], stdout=log_file,
                                     stderr=subprocess.STDOUT)
    url = f"http://{'localhost' if args.host in ('127.0.0.1', '::1') else args.host}:{args.port}"
    threading.Thread(target=_greet, args=(url, settings, log_path, log_start, worker_process), daemon=True).start()
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, limit_concurrency=settings.max_connections,
                    log_config=None)
    finally:
        worker_process.terminate()
        try:
            worker_process.wait(timeout=settings.worker_soft_shutdown_s + 10)
        except subprocess.TimeoutExpired:
            worker_process.kill()
            worker_process.wait()


def _greet(url: str, settings, log_path: Path, log_start: int, worker_process) -> None:
    """Once the API answers, what a new user needs to know; then a line when the worker is ready."""
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/livez", timeout=2).status_code == 200:
                break
        time.sleep(0.2)
    keys = ("required: make one with `scratchllm keys create --name me`" if settings.api_keys_required
            else "not needed: this machine only")
    print(f"ScratchLLM is running at {url}\n"
          f"  API docs   {url}/docs\n"
          f"  data       {settings.data_dir}\n"
          f"  logs       {log_path} (SCRATCHLLM_LOG_LEVEL={settings.log_level})\n"
          f"  API keys   {keys}\n"
          f"  client     scratchllm corpora upload FILE --kind text, then scratchllm --help\n"
          f"Ctrl-C stops everything.", flush=True)
    while time.monotonic() < deadline + 120 and worker_process.poll() is None:
        with open(log_path, "rb") as log:
            log.seek(log_start)
            if re.search(rb"celery@\S+ ready", log.read()):
                print(f"Worker ready (pid {worker_process.pid}): jobs will run.", flush=True)
                return
        time.sleep(0.5)
    print(f"The worker is not ready: see {log_path}", flush=True)


def db_upgrade(_args: argparse.Namespace) -> None:
    from core.migrate import upgrade
    from core.settings import settings_from_environment

    settings = settings_from_environment()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.sqlalchemy_url)
    print("database is at the latest revision")


def keys_create(args: argparse.Namespace) -> None:
    from core.db import Database
    from core.keys import create_key
    from core.settings import settings_from_environment

    database = Database(settings_from_environment().sqlalchemy_url)
    with database.session() as session:
        api_key, key = create_key(session, args.name, KeyScope(args.scope))
        print(f"created {api_key.scope} key {api_key.id} ({args.name}); it is shown only now:\n{key}")
    database.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scratchllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="train and sample a tiny GPT on this machine")
    demo_parser.add_argument("--text", help="a UTF-8 text file (default: a bundled sample)")
    demo_parser.add_argument("--steps", type=int, default=300)
    demo_parser.add_argument("--vocab-size", type=int, default=512)
    demo_parser.add_argument("--context", type=int, default=64)
    demo_parser.add_argument("--seed", type=int, default=1)
    demo_parser.add_argument("--out", default="runs/demo")
    demo_parser.set_defaults(handler=demo)
    up_parser = commands.add_parser("up", help="run the whole service on this machine (embedded mode)")
    up_parser.add_argument("--host", default="127.0.0.1")
    up_parser.add_argument("--port", type=int, default=8000)
    up_parser.add_argument("--data-dir", help="default: $SCRATCHLLM_DATA_DIR or ./scratchllm-data")
    up_parser.set_defaults(handler=up)
    commands.add_parser("worker", help="run a training worker").set_defaults(handler=worker)
    api_parser = commands.add_parser("api", help="serve the REST API")
    api_parser.add_argument("--host", default="127.0.0.1")
    api_parser.add_argument("--port", type=int, default=8000)
    api_parser.add_argument("--migrate", action="store_true", help="apply the migrations first")
    api_parser.set_defaults(handler=api)
    db_parser = commands.add_parser("db", help="database maintenance")
    db_commands = db_parser.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="apply the migrations").set_defaults(handler=db_upgrade)
    keys_parser = commands.add_parser("keys", help="API keys")
    keys_commands = keys_parser.add_subparsers(dest="keys_command", required=True)
    create_parser = keys_commands.add_parser("create", help="create an API key and print it once")
    create_parser.add_argument("--name", required=True)
    create_parser.add_argument("--scope", choices=[scope.value for scope in KeyScope], default=KeyScope.ADMIN.value)
    create_parser.set_defaults(handler=keys_create)
    add_client_commands(commands)
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
