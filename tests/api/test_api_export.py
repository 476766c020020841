"""Exporting a checkpoint for Hugging Face transformers: GET /v1/checkpoints/{id}/export?format=hf."""

import io
import json
import os
import re
import tarfile
import time
from dataclasses import replace

import httpx
import pytest
import torch

from model import GPT, GPTClassifier, GPTConfig, gpt2_tokenizer, load_checkpoint
from tests.helpers import TINY_LM, add_checkpoint, assert_error, deploy, sentencepiece

transformers = pytest.importorskip("transformers")

TEXTS = ["Hello, world!", "  two spaces,\n\ttabs and\n\n\nnewlines  ", "naïve café — 日本語 🤖 ½", "it's 12,345; we'll",
         "one<|endoftext|>two", "<|endoftext|>", "<|endoftext"]
EXPORTED_FILES = {"model.safetensors", "config.json", "generation_config.json", "vocab.json", "merges.txt",
                  "tokenizer_config.json"}


@torch.no_grad()
def random_gpt() -> GPT:
    """LayerNorm weights and biases random too, so a dropped or swapped tensor shows in the logits."""
    model = GPT(TINY_LM).eval()
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(0.02 * noise if param.dim() == 2 else 1 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
    return model


def export_url(checkpoint_id: str) -> str:
    return f"/v1/checkpoints/{checkpoint_id}/export?format=hf"


def staging(api):
    """Where exports are written before they are sent."""
    return api.app.state.services.settings.storage.checkpoints / ".staging"


def test_export_loads_in_transformers_with_our_logits_and_token_ids(api, tmp_path):
    ours = random_gpt()
    checkpoint = add_checkpoint(api, ours)
    response = api.get(export_url(checkpoint))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-tar"
    assert f'filename="{checkpoint}-hf.tar"' in response.headers["content-disposition"]
    assert int(response.headers["content-length"]) == len(response.content)
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    exported = tmp_path / f"{checkpoint}-hf"
    assert {file.name for file in exported.iterdir()} == EXPORTED_FILES
    assert list(staging(api).iterdir()) == []

    hf = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    idx = torch.randint(0, TINY_LM.vocab_size, (2, TINY_LM.context_length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4
    assert hf.generation_config.eos_token_id == 50256

    tokenizer, hf_tokenizer = gpt2_tokenizer(), transformers.AutoTokenizer.from_pretrained(exported)
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert hf_tokenizer(text)["input_ids"] == ids, text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id
    assert hf_tokenizer.model_max_length == TINY_LM.context_length


@pytest.mark.parametrize(("model", "label_names", "reason"), [
    (lambda: GPTClassifier(TINY_LM, 2), ["no", "yes"], "GPTClassifier"),
    (lambda: GPT(replace(TINY_LM, bias=False)), None, "bias=False"),
], ids=["classifier", "no_biases"])
def test_what_gpt2_cannot_express_is_422_naming_why(api, model, label_names, reason):
    checkpoint = add_checkpoint(api, model(), label_names=label_names)
    assert_error(api.get(export_url(checkpoint)), 422, "cannot be exported as a Hugging Face model", reason,
                 param="checkpoint_id")
    assert list(staging(api).iterdir()) == []


def test_unknown_checkpoint_is_404_and_a_format_other_than_hf_is_422(api):
    assert_error(api.get(export_url("ckpt_nope")), 404, "ckpt_nope")
    checkpoint = add_checkpoint(api, GPT(TINY_LM))
    assert_error(api.get(f"/v1/checkpoints/{checkpoint}/export?format=gguf"), 422, "'hf'", param="format")
    assert_error(api.get(f"/v1/checkpoints/{checkpoint}/export"), 422, param="format")


def open_in(folder) -> list[str]:
    """This process's descriptors on files under folder, deleted ones included: the count of every descriptor moves
    with other threads' sockets and database connections, so only these say whether the export let go."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed between the listing and the look
            continue
    return [target for target in targets if target.startswith(str(folder))]


def test_an_export_the_client_abandons_leaves_no_file_and_no_descriptor(api, live_server):
    # Weights of 50 MB: more than loopback socket buffers usually take, so the server is mid-archive when the client
    # goes (with buffers autotuned to 32 MB it may have sent everything: the cleanup is checked either way).
    checkpoint = add_checkpoint(api, GPT(replace(TINY_LM, n_embd=256)))
    url = live_server + export_url(checkpoint)
    storage = staging(api).parent

    def cleaned_up() -> None:  # the server removes the export after the last byte it sends, so soon, not at once
        deadline = time.monotonic() + 10
        while list(staging(api).iterdir()) or open_in(storage):
            assert time.monotonic() < deadline, (list(staging(api).iterdir()), open_in(storage))
            time.sleep(0.05)

    with httpx.stream("GET", url) as complete:
        complete.read()
    cleaned_up()
    with httpx.stream("GET", url) as abandoned:
        assert abandoned.status_code == 200
        next(abandoned.iter_raw(1024))
    cleaned_up()


def test_a_llama_checkpoint_exports_to_transformers_and_imports_back(api, tmp_path):
    torch.manual_seed(0)
    # tied and 8 wide: the weights (1.6 MB) fit the test service's upload limit, to be imported back
    ours = GPT(GPTConfig.preset("qwen3-nano", context_length=64, n_embd=8, n_head=2, n_kv_head=1,
                                tie_embeddings=True)).eval()
    checkpoint = add_checkpoint(api, ours)
    response = api.get(export_url(checkpoint))
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    exported = tmp_path / f"{checkpoint}-hf"
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    idx = torch.randint(0, ours.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4

    imported = api.post("/v1/checkpoints/import", files={
        "weights": ("model.safetensors", (exported / "model.safetensors").read_bytes()),
        "config": ("config.json", (exported / "config.json").read_bytes())})
    assert imported.status_code == 201, imported.text
    architecture = imported.json()["architecture"]
    assert (architecture["position"], architecture["qk_norm"], architecture["n_kv_head"]) == ("rope", True, 1)


@pytest.fixture(scope="module")
def llama_with_its_tokenizer(tmp_path_factory, shared_data):
    """A random Llama 2-shaped transformers model (its vocabulary padded past its SentencePiece-style tokenizer's,
    as published models pad theirs) saved as Hugging Face publishes it, with its tokenizer.json."""
    backend = sentencepiece((shared_data / "the-verdict.txt").read_text(encoding="utf-8"))
    vocab = backend.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab + 4, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, eos_token_id=backend.token_to_id("</s>"),
        bos_token_id=backend.token_to_id("<s>"), tie_word_embeddings=False)).eval()
    directory = tmp_path_factory.mktemp("llama2")
    hf.save_pretrained(directory)
    (directory / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
    return hf, backend, directory


def import_parts(directory, **replaced) -> dict:
    files = {"weights": "model.safetensors", "config": "config.json", "tokenizer": "tokenizer.json"}
    return {part: (file, replaced.get(part, (directory / file).read_bytes())) for part, file in files.items()
            if replaced.get(part, b"") is not None}


def test_a_model_imported_with_its_tokenizer_json_tokenizes_generates_and_exports_as_transformers(
        api, llama_with_its_tokenizer, tmp_path):
    hf, backend, directory = llama_with_its_tokenizer
    reference = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
    response = api.post("/v1/checkpoints/import", files=import_parts(directory))
    assert response.status_code == 201, response.text
    checkpoint = response.json()
    assert checkpoint["tokenizer_type"] == "hf" and checkpoint["architecture"]["vocab_size"] == hf.config.vocab_size

    deploy(api, "llama2", checkpoint["id"])
    for text in TEXTS:
        tokens = api.post("/tokenize", json={"model": "llama2", "prompt": text}).json()["tokens"]
        assert tokens == reference.encode(text, add_special_tokens=False), text
    prompt = "I had always thought Jack"
    ids = reference.encode(prompt, add_special_tokens=False)
    expected = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    answer = api.post("/d/llama2/generate", json={"inputs": prompt, "parameters": {
        "max_new_tokens": 8, "details": True}}).json()  # greedy, ending at </s> as transformers' does
    assert [t["id"] for t in answer["details"]["tokens"]] == expected
    constrained = api.post("/d/llama2/generate", json={"inputs": prompt, "parameters": {
        "max_new_tokens": 8, "grammar": {"type": "regex", "value": "[a-z]+"}}})  # llguidance reads tokenizer.json
    assert constrained.status_code == 200, constrained.text
    assert re.fullmatch("[a-z]*", constrained.json()["generated_text"])

    response = api.get(export_url(checkpoint["id"]))
    assert response.status_code == 200, response.text
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    exported = tmp_path / f"{checkpoint['id']}-hf"
    assert (exported / "tokenizer.json").read_text(encoding="utf-8") == backend.to_str()
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert tokenizer.eos_token == "</s>"
    assert all(tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
               for text in TEXTS)
    again = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    idx = torch.tensor([ids])
    with torch.no_grad():
        assert (again(idx).logits - hf(idx).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("replaced, words", [
    ({"tokenizer": b"{not json"}, ("tokenizer.json", "not valid JSON")),
    ({"tokenizer": b"\xff\xfe"}, ("tokenizer.json", "UTF-8")),
    ({"tokenizer": b"[" * 100_000}, ("tokenizer.json",)),
    ({"tokenizer": json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}).encode()},
     ("tokenizer.json", "eos_token_id")),
    ({"tokenizer": None}, ("vocabulary has", "50257", "tokenizer.json")),  # GPT-2's tokenizer would not fit
], ids=["not_json", "not_utf8", "nested_too_deeply", "no_end_of_text", "missing"])
def test_a_tokenizer_json_that_cannot_serve_is_422(api, llama_with_its_tokenizer, replaced, words):
    _, _, directory = llama_with_its_tokenizer
    response = api.post("/v1/checkpoints/import", files=import_parts(directory, **replaced))
    assert_error(response, 422, *words)
    assert api.get("/v1/checkpoints").json()["data"] == []


def test_a_tokenizer_larger_than_the_model_is_422(api, llama_with_its_tokenizer, tmp_path):
    hf, backend, directory = llama_with_its_tokenizer
    smaller = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{
        **hf.config.to_dict(), "vocab_size": backend.get_vocab_size(with_added_tokens=True) - 10}))
    smaller.save_pretrained(tmp_path)
    response = api.post("/v1/checkpoints/import", files=import_parts(directory, **{
        part: (tmp_path / file).read_bytes() for part, file in (("weights", "model.safetensors"),
                                                               ("config", "config.json"))}))
    assert_error(response, 422, "fewer than the", "tokenizer.json")


def test_an_import_can_serve_at_a_shorter_context(api, llama_with_its_tokenizer):
    hf, _, directory = llama_with_its_tokenizer
    for value in ("0", "1", "65", "many", "-3"):  # the config's context is 64
        response = api.post("/v1/checkpoints/import", files=import_parts(directory), data={"context_length": value})
        assert_error(response, 422, "context_length")
    response = api.post("/v1/checkpoints/import", files=import_parts(directory), data={"context_length": "16"})
    assert response.status_code == 201, response.text
    assert response.json()["architecture"]["context_length"] == 16
    deploy(api, "short", response.json()["id"])
    too_long = api.post("/v1/completions", json={"model": "short", "prompt": "I had always thought " * 8,
                                                 "max_tokens": 1})
    assert_error(too_long, 400, "context")
    answer = api.post("/v1/completions", json={"model": "short", "prompt": "I had", "max_tokens": 40}).json()
    assert answer["usage"]["total_tokens"] <= 16  # generation stops at the shorter context


def test_a_gpt2_import_at_a_shorter_context_keeps_the_first_positions(api, tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2, n_positions=64)).eval()
    hf.save_pretrained(tmp_path)
    response = api.post("/v1/checkpoints/import", data={"context_length": "10"}, files={
        "weights": ("model.safetensors", (tmp_path / "model.safetensors").read_bytes()),
        "config": ("config.json", (tmp_path / "config.json").read_bytes())})
    assert response.status_code == 201, response.text
    checkpoint = response.json()["id"]
    with tarfile.open(fileobj=io.BytesIO(api.get(f"/v1/checkpoints/{checkpoint}/download").content)) as tar:
        tar.extractall(tmp_path / "downloaded", filter="data")
    ours = load_checkpoint(tmp_path / "downloaded" / checkpoint)[0]
    assert ours.wpe.weight.shape == (10, 8) and torch.equal(ours.wpe.weight, hf.transformer.wpe.weight[:10])
    idx = torch.randint(0, 50257, (1, 10))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() < 1e-4


def test_text_an_imported_tokenizer_cannot_encode_is_refused_by_name(api, llama_with_its_tokenizer):
    _, backend, directory = llama_with_its_tokenizer

    def splitting_on(pattern: str) -> bytes:  # a pre-tokenizer regex that backtracks past the library's limit
        config = json.loads(backend.to_str())
        config["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
                                   "invert": False}
        return json.dumps(config).encode()

    # one that fails on ordinary text is refused at import
    assert_error(api.post("/v1/checkpoints/import", files=import_parts(directory, tokenizer=splitting_on("(a+)+$"))),
                 422, "tokenizer.json", "cannot encode")
    imported = api.post("/v1/checkpoints/import", files=import_parts(directory, tokenizer=splitting_on("(b+)+$")))
    assert imported.status_code == 201, imported.text
    deploy(api, "fragile", imported.json()["id"])
    hostile = "b" * 80 + "!"
    assert_error(api.post("/v1/completions", json={"model": "fragile", "prompt": hostile, "max_tokens": 2}),
                 400, "cannot encode")
    assert_error(api.post("/tokenize", json={"model": "fragile", "prompt": hostile}), 400, "cannot encode")
    assert api.post("/d/fragile/generate", json={"inputs": hostile}).status_code == 422
    answer = api.post("/v1/completions", json={"model": "fragile", "prompt": "I had", "max_tokens": 2})
    assert answer.status_code == 200, answer.text  # the deployment serves on
