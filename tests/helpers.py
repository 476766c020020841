"""Assertions and setup shared by the tests."""

import contextlib
import copy
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from fastapi.testclient import TestClient
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from core.checkpoints import register_checkpoint
from core.db import Database
from core.tables import Checkpoint
from model import (
    GPT,
    Adapter,
    GPTConfig,
    LoRAConfig,
    apply_lora,
    gpt2_tokenizer,
    lora_state_dict,
    merge_lora,
    read_metadata,
    save_checkpoint,
    weights_sha256,
)

TINY_LM = GPTConfig(vocab_size=50257, context_length=64, n_layer=2, n_head=4, n_embd=32)  # GPT-2's tokenizer


def assert_error(response, status: int, *words: str, param: str | None = None) -> dict:
    """The response is our JSON error with this status, its message holds the words (and names param)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"type", "message", "param"}, error
    for word in words:
        assert word in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


def local_client(app, **options) -> TestClient:
    """A client of the app as its one user on this machine: a loopback address and host, as the open mode
    (no keys) asks of every request."""
    return TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000), **options)


def lenient(api) -> TestClient:
    """A client on the same running app that answers a server error as a 500 response instead of raising it."""
    return local_client(api.app, raise_server_exceptions=False)


def upload_corpus(api, content: bytes, filename: str, kind: str) -> str:
    response = api.post("/v1/corpora", data={"kind": kind}, files={"file": (filename, content)})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def register_model(settings, model, label_names=None, prompt_format=None, tokenizer=None, **saved) -> str:
    """Save model (with GPT-2's tokenizer unless another is given; saved: save_checkpoint's other options) into the
    service's data dir and register it, as a finished training job would."""
    directory = save_checkpoint(settings.data_dir / f"checkpoints/test/{uuid.uuid4().hex}", model,
                                tokenizer or gpt2_tokenizer(), label_names=label_names, prompt_format=prompt_format,
                                **saved)
    database = Database(settings.sqlalchemy_url)
    try:
        with database.session() as session:
            return register_checkpoint(session, settings.storage, directory, read_metadata(directory)).id
    finally:
        database.dispose()


def add_checkpoint(api, model, label_names=None, prompt_format=None) -> str:
    return register_model(api.app.state.services.settings, model, label_names, prompt_format)


def random_lora(base: GPT, lora: LoRAConfig, seed: int, std: float = 0.1) -> GPT:
    """A copy of base with LoRA layers of random tensors: B too, which a fresh adapter starts at zero."""
    torch.manual_seed(seed)
    adapted = copy.deepcopy(base)
    apply_lora(adapted, lora)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if name.endswith("lora_b"):
                param.normal_(0, std)
    return adapted


def random_adapter(base: GPT, lora: LoRAConfig, seed: int) -> tuple[Adapter, GPT]:
    """An adapter of random tensors over base, and base with it merged, to compare against."""
    adapted = random_lora(base, lora, seed)
    tensors = {name: tensor.clone() for name, tensor in lora_state_dict(adapted).items()}
    return Adapter(lora, tensors, {}), merge_lora(adapted).eval()


def add_adapter(settings, base_id: str, base: GPT, seed: int, prompt_format=None, **lora) -> tuple[str, GPT]:
    """Register an adapter-only checkpoint of random LoRA weights (LoRAConfig's fields in lora) over base, the model
    of checkpoint base_id; returns its id and base with the adapter merged in, to compare the served one with."""
    database = Database(settings.sqlalchemy_url)
    with database.session() as session:
        base_meta = read_metadata(settings.storage.checkpoint_dir(session.get(Checkpoint, base_id).path))
    database.dispose()
    config = LoRAConfig(**lora)
    adapted = random_lora(base, config, seed, std=0.5)
    checkpoint_id = register_model(settings, adapted, prompt_format=prompt_format, parent=base_id, lora=config,
                                   adapter_of={"sha256": weights_sha256(base_meta)})
    return checkpoint_id, merge_lora(adapted).eval()


def deploy(api, name: str, checkpoint_id: str, **extra) -> dict:
    """Create a deployment and wait until it has loaded (or failed to)."""
    response = api.post("/v1/deployments", json={"name": name, "checkpoint_id": checkpoint_id, **extra})
    assert response.status_code == 201, response.text
    deadline = time.monotonic() + 30
    while (state := api.get(f"/v1/deployments/{name}").json())["state"] == "loading":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return state


def chat_completion(content: str) -> bytes:
    return json.dumps({"object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode()


@contextmanager
def recording_server(body: bytes, status: int = 200, headers: dict | None = None) -> Iterator[tuple[str, list]]:
    """An HTTP server on 127.0.0.1 that answers every POST alike: (its base URL, the headers of each request)."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(dict(self.headers))
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(status)
            for name, value in {"content-type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args):  # no access log in the test output
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """The app (its lifespan already run by a TestClient) served by uvicorn on a free local port: its URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def key_in(database_url: str, scope: str, name: str = "test") -> str:
    """A key made as `scratchllm keys create` makes it, straight in the database at database_url."""
    from core.enums import KeyScope
    from core.keys import create_key

    database = Database(database_url)
    try:
        with database.session() as session:
            return create_key(session, name, KeyScope(scope))[1]
    finally:
        database.dispose()


def create_api_key(app, scope: str, name: str = "test") -> str:
    return key_in(app.state.services.settings.sqlalchemy_url, scope, name)


def byte_level(corpus: str) -> Backend:
    """A byte-level BPE as Llama 3's and Qwen's tokenizer.json are."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([corpus], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|end_of_text|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return backend


def sentencepiece(corpus: str) -> Backend:
    """A SentencePiece-style BPE with byte fallback and "▁" for spaces, as Llama 2's tokenizer.json is."""
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    backend = Backend(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    # SentencePiece's pieces never hold a space but at their start: trained split at the marks, which Llama 2's
    # file then leaves to the merges alone (no pre-tokenizer)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=list("▁"))
    backend.train_from_iterator([corpus], trainer)
    # byte fallback ids are ordinary vocabulary entries in Llama 2's file, not added tokens
    vocab = backend.get_vocab()
    config = json.loads(backend.to_str()) | {"pre_tokenizer": None}
    config["model"]["vocab"] |= {token: len(vocab) + i for i, token in enumerate(byte_tokens)}
    return Backend.from_str(json.dumps(config))
