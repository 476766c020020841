"""The command-line client of a running server: corpora, jobs (with a live progress bar), checkpoints,
deployments, generation, chat and classification.

The server is SCRATCHLLM_URL (default http://127.0.0.1:8000) and the key SCRATCHLLM_API_KEY, or --url and
--api-key. Exit status: 0 done; 1 the server refused the request or could not be reached, or the job failed;
3 the job was cancelled.
"""

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import yaml
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from rich.text import Text

from core.enums import CorpusKind, ServingDtype
from core.jobs import TRAINING

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_FAILED, EXIT_CANCELLED = 1, 3
FINAL_STATUS = {"succeeded": 0, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
POLL_S = 0.5
# what the server says (names, errors) is printed as it is, never read as rich markup
console = Console(markup=False, highlight=False)
errors = Console(stderr=True, markup=False, highlight=False)


class ClientError(Exception):
    """The server refused a request (its message and status), or could not be reached (no status)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Client:
    def __init__(self, url: str, api_key: str | None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=httpx.Timeout(30, read=None))

    def call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self.http.base_url}: {e}") from None
        if response.status_code >= 400:
            raise ClientError(_message(response), response.status_code)
        return response.json()

    def events(self, path: str, body: dict) -> Iterator[dict]:
        """The JSON of each server-sent event of a streamed POST."""
        try:
            with self.http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(_message(response), response.status_code)
                for line in response.iter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        yield json.loads(line[5:])
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach {self.http.base_url}: {e}") from None


def _message(response: httpx.Response) -> str:
    """The error a server answered, in its own words: `{"error": {"message"}}`, or TGI's `{"error": str}`."""
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:300]}"
    return f"HTTP {response.status_code}: {error['message'] if isinstance(error, dict) else error}"


# -- corpora ---------------------------------------------------------------------------------------------------

def corpora_upload(client: Client, args: argparse.Namespace) -> None:
    path = Path(args.file)
    fields = {"kind": args.kind, **({"name": args.name} if args.name else {})}
    with Progress(TextColumn("uploading {task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=errors, transient=True) as progress, open(path, "rb") as file:
        reader = progress.wrap_file(file, total=path.stat().st_size, description=path.name)
        corpus = client.call("POST", "/v1/corpora", data=fields, files={"file": (path.name, reader)})
    _show(args, corpus, f"corpus {corpus['id']}: {corpus['kind']}, {corpus['n_records']:,} records, "
                        f"{corpus['n_tokens'] or 0:,} tokens")


def corpora_list(client: Client, args: argparse.Namespace) -> None:
    page = client.call("GET", "/v1/corpora", params={"limit": args.limit})
    _table(args, page["data"], ["id", "name", "kind", "n_records", "n_tokens", "size_bytes"])


# -- jobs ------------------------------------------------------------------------------------------------------

def job_request(args: argparse.Namespace) -> dict:
    """The job from --file (YAML or JSON), with the flags given on top of it."""
    body = yaml.safe_load(Path(args.file).read_text()) if args.file else {}
    if not isinstance(body, dict):
        raise ClientError(f"{args.file} must hold one mapping (a job request)")
    hyperparameters = body.setdefault("hyperparameters", {})
    for flag, field in (("steps", "max_steps"), ("epochs", "epochs"), ("batch_size", "batch_size"),
                        ("learning_rate", "learning_rate"), ("grad_accum_steps", "grad_accum_steps")):
        if getattr(args, flag) is not None:
            hyperparameters[field] = getattr(args, flag)
    for flag, field in (("type", "type"), ("corpus", "corpus_id"), ("base", "base_checkpoint_id"),
                        ("name", "name"), ("devices", "devices"), ("nodes", "nodes"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            body[field] = getattr(args, flag)
    if args.preset is not None:
        body.setdefault("model", {})["preset"] = args.preset
    body.setdefault("type", "pretrain")
    return body


def jobs_start(client: Client, args: argparse.Namespace) -> int:
    job = client.call("POST", "/v1/jobs", json=job_request(args))
    errors.print(f"job {job['id']} queued ({job['type']})")
    return follow(client, job["id"]) if args.follow else _show(args, job, job["id"])


def follow(client: Client, job_id: str) -> int:
    """A live progress bar until the job ends; its exit status."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("step {task.fields[step]}"),
               TextColumn("{task.fields[loss]}"), TextColumn("{task.fields[rate]}"), TextColumn("eta"),
               TimeRemainingColumn())
    job = client.call("GET", f"/v1/jobs/{job_id}")
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(job_id, total=job["progress"]["total_steps"], step="", loss="", rate="")
        while True:
            p = job["progress"]
            progress.update(task, completed=p["step"], description=f"{job_id} {job['status']}",
                            step=f"{p['step']}/{p['total_steps']}",
                            loss=f"loss {p['train_loss']:.4f}" if p["train_loss"] is not None else "",
                            rate=f"{p['tokens_per_s']:,.0f} tok/s" if p["tokens_per_s"] else "")
            if job["status"] in FINAL_STATUS:
                break
            time.sleep(POLL_S)
            job = client.call("GET", f"/v1/jobs/{job_id}")
    p = job["progress"]
    losses = "".join(f", {name} {p[key]:.4f}" for name, key in (("train loss", "train_loss"), ("val loss", "val_loss"))
                     if p[key] is not None)
    ending = f"job {job_id} {job['status']} at step {p['step']}{losses}" + (f": {job['error']}" if job["error"] else "")
    (console if job["status"] == "succeeded" else errors).print(ending)
    newest = client.call("GET", "/v1/checkpoints", params={"job_id": job_id, "limit": 1})["data"]
    if newest:  # what to evaluate, finetune or deploy next
        console.print(f"its last checkpoint: {newest[0]['id']} (step {newest[0]['step']})")
    return FINAL_STATUS[job["status"]]


def jobs_follow(client: Client, args: argparse.Namespace) -> int:
    return follow(client, args.job_id)


def jobs_list(client: Client, args: argparse.Namespace) -> None:
    params = {"limit": args.limit, **{k: v for k, v in (("status", args.status), ("type", args.type)) if v}}
    rows = [{**job, "step": f"{job['progress']['step']}/{job['progress']['total_steps']}",
             "loss": job["progress"]["train_loss"]} for job in client.call("GET", "/v1/jobs", params=params)["data"]]
    _table(args, rows, ["id", "name", "type", "status", "step", "loss", "created_at"])


def jobs_show(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.call("GET", f"/v1/jobs/{args.job_id}"), None)


def jobs_cancel(client: Client, args: argparse.Namespace) -> None:
    job = client.call("POST", f"/v1/jobs/{args.job_id}/cancel")
    _show(args, job, f"job {job['id']}: {job['status']}{' (cancel requested)' if job['cancel_requested'] else ''}")


# -- evaluations ---------------------------------------------------------------------------------------------------

def evaluate(client: Client, args: argparse.Namespace) -> int:
    body = {"checkpoint_id": args.checkpoint, "corpus_id": args.corpus,
            **({"max_examples": args.max_examples} if args.max_examples else {})}
    evaluation = client.call("POST", "/v1/evaluations", json=body)
    errors.print(f"evaluation {evaluation['id']} queued (job {evaluation['job_id']})")
    if not args.follow:
        return _show(args, evaluation, evaluation["id"])
    status = follow(client, evaluation["job_id"])
    evaluation = client.call("GET", f"/v1/evaluations/{evaluation['id']}")
    metrics = {k: v for k, v in (evaluation["metrics"] or {}).items() if isinstance(v, int | float)}
    _show(args, evaluation, "  ".join(f"{name} {value:.4g}" for name, value in metrics.items()))
    return status


def compare(client: Client, args: argparse.Namespace) -> None:
    params = {"ids": ",".join(args.ids)} if args.ids else {"corpus_id": args.corpus}
    comparison = client.call("GET", "/v1/evaluations/compare", params=params)
    if args.json:
        console.print_json(json.dumps(comparison))
        return
    rows = []
    for row in comparison["rows"]:
        cells = {"evaluation": row["evaluation_id"], "checkpoint": row["checkpoint_id"], "step": row["checkpoint_step"]}
        for name in comparison["metrics"]:
            value = (row["metrics"] or {}).get(name)
            best = comparison["best"].get(name) == row["evaluation_id"]
            cells[name] = None if not isinstance(value, int | float) else f"{value:.4g}{' *' if best else ''}"
        rows.append(cells)
    _table(args, rows, ["evaluation", "checkpoint", "step", *comparison["metrics"]])
    for note in comparison["notes"]:
        errors.print(note)


# -- checkpoints, deployments, inference -------------------------------------------------------------------------

def checkpoints_list(client: Client, args: argparse.Namespace) -> None:
    params = {"limit": args.limit, **({"job_id": args.job} if args.job else {})}
    rows = client.call("GET", "/v1/checkpoints", params=params)["data"]
    _table(args, rows, ["id", "task", "step", "job_id", "source", "adapter_of_id", "size_bytes", "created_at"])


def adapter_argument(text: str) -> tuple[str, str]:
    name, equals, checkpoint = text.partition("=")
    if not (equals and name and checkpoint):
        raise argparse.ArgumentTypeError(f"{text!r}: give an adapter as NAME=CHECKPOINT")
    return name, checkpoint


def deploy(client: Client, args: argparse.Namespace) -> None:
    adapters = dict(args.adapter) if args.adapter is not None else None
    change = {"checkpoint_id": args.checkpoint, "device": args.device, "dtype": args.dtype,
              **({"default": True} if args.default else {}), **({"adapters": adapters} if adapters is not None else {})}
    try:
        client.call("GET", f"/v1/deployments/{args.name}")
        deployment = client.call("PATCH", f"/v1/deployments/{args.name}", json=change)
    except ClientError as e:
        if e.status != 404:
            raise
        deployment = client.call("POST", "/v1/deployments", json={"name": args.name, **change})
    deadline = time.monotonic() + args.timeout
    while deployment["state"] == "loading" or deployment["serving_checkpoint_id"] != args.checkpoint or (
            deployment["serving_adapters"] != deployment["adapters"]):
        if deployment["error"]:
            raise ClientError(f"deployment {args.name}: {deployment['error']}")
        if time.monotonic() > deadline:
            raise ClientError(f"deployment {args.name} does not serve {args.checkpoint} after {args.timeout:g} s "
                              f"(it is {deployment['state']}); `scratchllm deploy` again, or see GET "
                              f"/v1/deployments/{args.name}")
        time.sleep(POLL_S)
        deployment = client.call("GET", f"/v1/deployments/{args.name}")
    _show(args, deployment, f"deployment {args.name}: {deployment['state']}, checkpoint {args.checkpoint} on "
                            f"{deployment['served_device']} {deployment['served_dtype']}")


def generate(client: Client, args: argparse.Namespace) -> None:
    parameters = {"max_new_tokens": args.max_tokens, **({"temperature": args.temperature, "do_sample": True}
                                                        if args.temperature else {})}
    path = f"/d/{args.deployment}/generate_stream" if args.deployment else "/generate_stream"
    for event in client.events(path, {"inputs": args.prompt, "parameters": parameters}):
        if not event["token"]["special"]:
            sys.stdout.write(event["token"]["text"])
            sys.stdout.flush()
    sys.stdout.write("\n")


def chat(client: Client, args: argparse.Namespace) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    errors.print("chat: an empty line or Ctrl-D ends it")
    while True:
        try:
            line = console.input("you> ")
        except EOFError:
            break
        if not line.strip():
            break
        messages.append({"role": "user", "content": line})
        answer = []
        sys.stdout.write("model> ")
        body = {"model": args.deployment, "messages": messages, "stream": True, "max_tokens": args.max_tokens}
        for chunk in client.events("/v1/chat/completions", body):
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content") or ""
                answer.append(text)
                sys.stdout.write(text)
                sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(answer)})


def classify(client: Client, args: argparse.Namespace) -> None:
    result = client.call("POST", "/classify", json={"input": args.texts, "model": args.deployment})
    rows = [{"text": text, "label": row["label"], "probabilities": " ".join(f"{p:.3f}" for p in row["probs"])}
            for text, row in zip(args.texts, result["data"], strict=True)]
    _table(args, rows, ["text", "label", "probabilities"])


# -- output ------------------------------------------------------------------------------------------------------

def _show(args: argparse.Namespace, value: dict, summary: str | None) -> int:
    if args.json or summary is None:
        console.print_json(json.dumps(value))
    else:
        console.print(summary)
    return 0


def _table(args: argparse.Namespace, rows: list[dict], columns: list[str]) -> None:
    if args.json:
        console.print_json(json.dumps(rows))
        return
    table = Table(*columns)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
    console.print(table)


def add_commands(commands) -> None:
    """The client's commands, under the `scratchllm` command's parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("SCRATCHLLM_URL", DEFAULT_URL), help="the server")
    common.add_argument("--api-key", default=os.environ.get("SCRATCHLLM_API_KEY"), help="an API key")
    common.add_argument("--json", action="store_true", help="print what the server answered, as JSON")

    def command(parent, name: str, handler, help_: str):
        parser = parent.add_parser(name, help=help_, parents=[common])
        parser.set_defaults(handler=run(handler))
        return parser

    def group(name: str, help_: str):
        return commands.add_parser(name, help=help_).add_subparsers(dest=f"{name}_command", required=True)

    corpora = group("corpora", "corpora on the server")
    upload = command(corpora, "upload", corpora_upload, "upload a corpus file, with a progress bar")
    upload.add_argument("file")
    upload.add_argument("--kind", required=True, choices=list(CorpusKind))
    upload.add_argument("--name")
    command(corpora, "list", corpora_list, "list corpora").add_argument("--limit", type=int, default=50)

    jobs = group("jobs", "training jobs on the server")
    start = command(jobs, "start", jobs_start, "start a job from flags or a YAML/JSON file")
    start.add_argument("--file", help="a job request in YAML or JSON; flags override its fields")
    start.add_argument("--type", choices=list(TRAINING))
    start.add_argument("--corpus", help="the corpus id")
    start.add_argument("--base", help="the base checkpoint id (finetunes)")
    start.add_argument("--preset", help="the model preset (pretraining)")
    start.add_argument("--name")
    start.add_argument("--steps", type=int)
    start.add_argument("--epochs", type=float, help="instead of --steps: passes over the training data")
    start.add_argument("--batch-size", type=int)
    start.add_argument("--learning-rate", type=float)
    start.add_argument("--grad-accum-steps", type=int)
    start.add_argument("--devices", type=lambda v: v if v == "auto" else int(v))
    start.add_argument("--nodes", type=int, help="machines training the job together, --devices on each")
    start.add_argument("--seed", type=int)
    start.add_argument("--follow", action="store_true", help="show its progress until it ends")
    command(jobs, "follow", jobs_follow, "show a job's progress until it ends").add_argument("job_id")
    listing = command(jobs, "list", jobs_list, "list jobs")
    listing.add_argument("--status")
    listing.add_argument("--type")
    listing.add_argument("--limit", type=int, default=50)
    command(jobs, "show", jobs_show, "a job, whole").add_argument("job_id")
    command(jobs, "cancel", jobs_cancel, "cancel a job").add_argument("job_id")

    checkpoints = group("checkpoints", "checkpoints on the server")
    listing = command(checkpoints, "list", checkpoints_list, "list checkpoints")
    listing.add_argument("--job")
    listing.add_argument("--limit", type=int, default=50)

    evaluating = command(commands, "evaluate", evaluate, "score a checkpoint on a corpus")
    evaluating.add_argument("checkpoint")
    evaluating.add_argument("--corpus", required=True)
    evaluating.add_argument("--max-examples", type=int)
    evaluating.add_argument("--follow", action="store_true", help="show its progress, then its numbers")
    comparing = command(commands, "compare", compare, "checkpoints x metrics, the best of each marked *")
    which = comparing.add_mutually_exclusive_group(required=True)
    which.add_argument("--corpus", help="every finished evaluation on this corpus")
    which.add_argument("--ids", nargs="+", help="these evaluations")

    deploying = command(commands, "deploy", deploy, "serve a checkpoint under a deployment name, and wait for it")
    deploying.add_argument("name")
    deploying.add_argument("checkpoint")
    deploying.add_argument("--default", action="store_true", help="make it the default deployment")
    deploying.add_argument("--device", default="auto")
    deploying.add_argument("--dtype", default=ServingDtype.AUTO, choices=list(ServingDtype))
    deploying.add_argument("--timeout", type=float, default=600, help="seconds to wait for it to serve")
    deploying.add_argument("--adapter", type=adapter_argument, action="append", metavar="NAME=CHECKPOINT", help=(
        "serve this adapter-only checkpoint over the deployment's, as the model NAME:ADAPTER (repeat it for more; "
        "given once or more, it replaces the deployment's adapters)"))

    generating = command(commands, "generate", generate, "stream a completion to the terminal")
    generating.add_argument("prompt")
    generating.add_argument("--deployment", help="default: the default deployment; DEPLOYMENT:ADAPTER for an adapter")
    generating.add_argument("--max-tokens", type=int, default=100)
    generating.add_argument("--temperature", type=float, help="sample at this temperature (default: greedy)")

    chatting = command(commands, "chat", chat, "chat with an instruction model")
    chatting.add_argument("--deployment", help="default: the default deployment; DEPLOYMENT:ADAPTER for an adapter")
    chatting.add_argument("--system", help="a system message")
    chatting.add_argument("--max-tokens", type=int, default=200)

    classifying = command(commands, "classify", classify, "classify texts with a classifier deployment")
    classifying.add_argument("texts", nargs="+")
    classifying.add_argument("--deployment")


def run(handler):
    """The handler as a command: a client for --url and --api-key, errors printed, the exit status."""
    def command(args: argparse.Namespace) -> None:
        try:
            status = handler(Client(args.url, args.api_key), args)
        except (ClientError, OSError, yaml.YAMLError) as e:  # refused, unreachable, or a file it cannot read
            errors.print(Text("error: ", style="red") + Text(str(e)))  # the server's words are not markup
            status = EXIT_FAILED
        except KeyboardInterrupt:
            status = 130
        sys.exit(status or 0)

    return command
