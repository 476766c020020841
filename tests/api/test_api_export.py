"""Exporting a checkpoint for Hugging Face transformers: GET /v1/checkpoints/{id}/export?format=hf."""

import io
import os
import tarfile
import time
from dataclasses import replace

import httpx
import pytest
import torch

from model import GPT, GPTClassifier, GPTConfig, gpt2_tokenizer
from tests.helpers import TINY_LM, add_checkpoint, assert_error

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
    with httpx.stream("GET", url) as complete:
        complete.read()
    storage = staging(api).parent
    assert open_in(storage) == []
    with httpx.stream("GET", url) as abandoned:
        assert abandoned.status_code == 200
        next(abandoned.iter_raw(1024))
    deadline = time.monotonic() + 10
    while list(staging(api).iterdir()) or open_in(storage):
        assert time.monotonic() < deadline, (list(staging(api).iterdir()), open_in(storage))
        time.sleep(0.05)


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
