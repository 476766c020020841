"""The checkpoints API: importing Hugging Face GPT-2 weights, reading, downloading, deleting."""

import io
import json
import os
import tarfile
import tempfile

import pytest
import torch

from tests.helpers import assert_error, lenient, upload_corpus

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=50257, n_layer=2, n_head=2, n_embd=32, n_positions=64)
TINY_ARCHITECTURE = {"vocab_size": 50257, "context_length": 64, "n_layer": 2, "n_head": 2, "n_embd": 32,
                     "dropout": 0.1, "qkv_bias": True, "bias": True, "layer_norm_eps": 1e-5,
                     "tie_embeddings": True, "position": "learned", "rope_theta": 10000.0, "rope_scaling": None,
                     "norm": "layernorm", "mlp": "gelu", "mlp_hidden": None, "n_kv_head": None, "qk_norm": False}
UPLOAD_LIMIT = 16_000_000  # the tiny model's weights are 6.5 MB (a 50257 x 32 embedding); the fixture allows 2 MB


@torch.no_grad()
def hf_model(**config) -> "transformers.GPT2LMHeadModel":
    """A random GPT-2, LayerNorm vectors too, so a dropped or swapped vector shows in the logits."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(0.02 * noise if param.dim() == 2 else (1 + 0.2 * noise) if name.endswith("weight") else
                    0.1 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """(the transformers model, its model.safetensors bytes, its config.json as a dict)."""
    model = hf_model(**TINY)
    folder = tmp_path_factory.mktemp("hf-gpt2")
    model.save_pretrained(folder, safe_serialization=True)
    return model, (folder / "model.safetensors").read_bytes(), json.loads((folder / "config.json").read_text())


@pytest.fixture(scope="module")
def small_vocab_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf-gpt2-vocab")
    hf_model(**{**TINY, "vocab_size": 1000}).save_pretrained(folder, safe_serialization=True)
    return (folder / "model.safetensors").read_bytes(), json.loads((folder / "config.json").read_text())


@pytest.fixture
def client(api):
    """The api fixture with an upload limit that takes the tiny model."""
    api.app.state.services.settings.max_upload_bytes = UPLOAD_LIMIT
    return api


def import_checkpoint(api, weights: bytes, config: dict | bytes):
    config = config if isinstance(config, bytes) else json.dumps(config).encode()
    return api.post("/v1/checkpoints/import", files={"weights": ("model.safetensors", weights),
                                                     "config": ("config.json", config)})



def data_dir(api):
    return api.app.state.services.settings.data_dir


def assert_nothing_imported(api) -> None:
    assert api.get("/v1/checkpoints").json()["data"] == []
    for folder in (data_dir(api) / "checkpoints" / ".staging", data_dir(api) / "checkpoints" / "imported"):
        assert not folder.exists() or list(folder.iterdir()) == [], list(folder.iterdir())



def test_downloads_leave_no_file_descriptor_and_no_file_behind(client, tiny_hf, tmp_path, monkeypatch):
    _, weights, config = tiny_hf
    checkpoint = import_checkpoint(client, weights, config).json()["id"]
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where an archive packed first would go
    url = f"/v1/checkpoints/{checkpoint}/download"
    first = client.get(url)
    assert first.status_code == 200
    open_before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        assert client.get(url).content == first.content
    assert len(os.listdir("/proc/self/fd")) <= open_before + 2  # the client's pools may open one or two
    with client.stream("GET", url) as abandoned:  # a client that goes away mid-archive
        next(abandoned.iter_bytes(1024))
    assert len(os.listdir("/proc/self/fd")) <= open_before + 2
    assert list(scratch.iterdir()) == [] and list(data_dir(client).rglob("*.tar")) == []


@pytest.mark.both_databases
def test_import_read_list_and_download(client, tiny_hf, tmp_path):
    hf, weights, config = tiny_hf
    response = import_checkpoint(client, weights, config)
    assert response.status_code == 201, response.text
    checkpoint = response.json()
    assert checkpoint["id"].startswith("ckpt_") and checkpoint["object"] == "checkpoint"
    assert (checkpoint["task"], checkpoint["source"], checkpoint["step"], checkpoint["tokenizer_type"]) == (
        "lm", "import", 0, "gpt2")
    assert checkpoint["architecture"] == TINY_ARCHITECTURE
    assert checkpoint["job_id"] is None and checkpoint["parent_id"] is None and checkpoint["label_names"] is None
    assert checkpoint["metrics"] == {} and checkpoint["prompt_format"] is None
    stored = data_dir(client) / "checkpoints" / "imported" / checkpoint["id"]
    assert checkpoint["size_bytes"] == sum(f.stat().st_size for f in stored.iterdir())
    assert list((data_dir(client) / "checkpoints" / ".staging").iterdir()) == []

    assert client.get(f"/v1/checkpoints/{checkpoint['id']}").json() == checkpoint
    listing = client.get("/v1/checkpoints").json()
    assert listing == {"object": "list", "data": [checkpoint], "has_more": False}
    assert client.get("/v1/checkpoints", params={"job_id": "job_nope"}).json()["data"] == []

    download = client.get(f"/v1/checkpoints/{checkpoint['id']}/download")
    assert download.status_code == 200, download.text
    assert download.headers["content-type"] == "application/x-tar"
    assert f"{checkpoint['id']}.tar" in download.headers["content-disposition"]
    assert int(download.headers["content-length"]) == len(download.content)
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        names = set(tar.getnames())
        assert {f"{checkpoint['id']}/model.safetensors", f"{checkpoint['id']}/config.json"} <= names, names
        tar.extractall(tmp_path / "extracted", filter="data")
    assert list(data_dir(client).rglob("*.tar")) == []  # streamed as it is made: no archive on disk

    from model import load_checkpoint

    ours, tokenizer, meta = load_checkpoint(tmp_path / "extracted" / checkpoint["id"])
    assert meta["task"] == "lm" and meta["source"] == "import" and meta["tokenizer"] == {"type": "gpt2"}
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (ours(idx)[0] - hf(idx).logits).abs().max().item()
    assert difference < 1e-4


def test_finetunes_from_an_imported_checkpoint_keep_it(client, tiny_hf):
    _, weights, config = tiny_hf
    checkpoint = import_checkpoint(client, weights, config).json()
    instructions = json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}] * 4).encode()
    corpus = upload_corpus(client, instructions, "i.json", "instruction")
    response = client.post("/v1/jobs", json={"type": "finetune_instruct", "corpus_id": corpus,
                                             "base_checkpoint_id": checkpoint["id"], "lora": {"rank": 4},
                                             "hyperparameters": {"max_steps": 5, "max_length": 64}})
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["status"] == "queued" and job["base_checkpoint_id"] == checkpoint["id"]
    assert job["spec"]["lora"] == {"rank": 4, "alpha": 16.0, "targets": ["c_attn", "c_proj", "c_fc"], "dropout": 0.0}
    sms = b"ham\thello there\nspam\twin a prize now\n"
    classifier = client.post("/v1/jobs", json={"type": "finetune_classifier", "base_checkpoint_id": checkpoint["id"],
                                               "corpus_id": upload_corpus(client, sms, "sms.tsv", "classification"),
                                               "trainable_blocks": 2})
    assert classifier.status_code == 201, classifier.text
    assert_error(client.post("/v1/jobs", json={"type": "finetune_instruct", "corpus_id": corpus,
                                               "base_checkpoint_id": checkpoint["id"],
                                               "hyperparameters": {"max_length": 65}}), 422,
                 "max_length 65 exceeds the base model's context length 64")

    stored = data_dir(client) / "checkpoints" / "imported" / checkpoint["id"]
    assert_error(client.delete(f"/v1/checkpoints/{checkpoint['id']}"), 409, "in use by queued or running job",
                 job["id"], classifier.json()["id"])
    for queued in (job["id"], classifier.json()["id"]):
        assert client.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"
    assert_error(client.delete(f"/v1/checkpoints/{checkpoint['id']}"), 409, "base of finished jobs")
    assert client.get(f"/v1/checkpoints/{checkpoint['id']}").status_code == 200 and stored.is_dir()


def test_delete_an_unused_checkpoint(client, tiny_hf):
    _, weights, config = tiny_hf
    checkpoint = import_checkpoint(client, weights, config).json()
    stored = data_dir(client) / "checkpoints" / "imported" / checkpoint["id"]
    assert stored.is_dir()
    response = client.delete(f"/v1/checkpoints/{checkpoint['id']}")
    assert response.status_code == 200, response.text
    assert response.json() == {"id": checkpoint["id"], "object": "checkpoint", "deleted": True}
    assert not stored.exists()
    assert_error(client.get(f"/v1/checkpoints/{checkpoint['id']}"), 404, checkpoint["id"])
    assert client.get("/v1/checkpoints").json()["data"] == []


def parts(weights: bytes, config: dict | bytes) -> dict:
    return {"weights": ("model.safetensors", weights),
            "config": ("config.json", config if isinstance(config, bytes) else json.dumps(config).encode())}


def without(config: dict, key: str) -> dict:
    return {k: v for k, v in config.items() if k != key}


IMPORT_ERRORS = [  # (id, function of (weights, config, small-vocab weights, small-vocab config) -> files; words)
    ("no_config_part", lambda w, c, sw, sc: {"weights": ("model.safetensors", w)}, ("'config'",)),
    ("no_weights_part", lambda w, c, sw, sc: {"config": ("config.json", json.dumps(c).encode())}, ("'weights'",)),
    ("garbage_weights", lambda w, c, sw, sc: parts(b"\x00garbage" * 100, c),
     ("not an importable GPT-2, Llama or Qwen3 checkpoint", "safetensors")),
    ("truncated_weights", lambda w, c, sw, sc: parts(w[:100_000], c), ("safetensors",)),
    ("llama_config_of_gpt2_weights", lambda w, c, sw, sc: parts(w, {**c, "model_type": "llama"}),
     ("hidden_size",)),  # read as a Llama, whose config names differ
    ("mistral_config", lambda w, c, sw, sc: parts(w, {**c, "model_type": "mistral"}), ("'mistral'",)),
    ("vocabulary_of_1000", lambda w, c, sw, sc: parts(sw, sc), ("1000 tokens", "50257")),
    ("config_not_json", lambda w, c, sw, sc: parts(w, b"{oops"), ("not an importable",)),
    ("config_without_n_head", lambda w, c, sw, sc: parts(w, without(c, "n_head")), ("n_head",)),
    ("relu_activation", lambda w, c, sw, sc: parts(w, {**c, "activation_function": "relu"}),
     ("activation_function",)),
    ("config_disagrees_with_weights", lambda w, c, sw, sc: parts(w, {**c, "n_embd": 64}), ("wte.weight", "shape")),
]


@pytest.mark.parametrize("files, words", [case[1:] for case in IMPORT_ERRORS], ids=[case[0] for case in IMPORT_ERRORS])
def test_import_errors_are_422_and_leave_nothing(client, tiny_hf, small_vocab_hf, files, words):
    _, weights, config = tiny_hf
    response = client.post("/v1/checkpoints/import", files=files(weights, config, *small_vocab_hf))
    assert_error(response, 422, *words)
    assert_nothing_imported(client)


def test_import_that_is_not_multipart_is_415(client, tiny_hf):
    _, _, config = tiny_hf
    assert_error(client.post("/v1/checkpoints/import", json=config), 415, "multipart/form-data", "'weights'")
    assert_error(client.post("/v1/checkpoints/import", content=b"raw", headers={"content-type": "application/octet"}),
                 415, "multipart/form-data")
    assert_nothing_imported(client)


def test_import_beyond_the_upload_limit_is_413(api, tiny_hf):
    _, weights, config = tiny_hf  # 6.5 MB against the fixture's 2 MB limit
    assert_error(import_checkpoint(api, weights, config), 413, "upload limit")
    assert_nothing_imported(api)


def test_unknown_checkpoint_is_404(api):
    assert_error(api.get("/v1/checkpoints/ckpt_nope"), 404, "ckpt_nope")
    assert_error(api.get("/v1/checkpoints/ckpt_nope/download"), 404, "ckpt_nope")
    assert_error(api.delete("/v1/checkpoints/ckpt_nope"), 404, "ckpt_nope")
    assert_error(api.get("/v1/checkpoints", params={"limit": 0}), 422, "limit")


# ---- bugs --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    lambda c: [1], lambda c: "gpt2", lambda c: {**c, "layer_norm_epsilon": "1e-5"},
    lambda c: {**c, "resid_pdrop": "0.1"}], ids=["array", "string", "eps_string", "pdrop_string"])
def test_malformed_config_values_are_422(client, tiny_hf, change):
    _, weights, config = tiny_hf
    response = import_checkpoint(lenient(client), weights, json.dumps(change(config)).encode())
    assert_error(response, 422, "config")
    assert_nothing_imported(client)


def test_config_errors_name_the_config_part(client, tiny_hf):
    _, weights, config = tiny_hf
    assert_error(import_checkpoint(client, weights, {**config, "model_type": "mistral"}), 422, "mistral",
                 param="config")


def test_import_errors_do_not_show_server_paths(client, tiny_hf):
    _, _, config = tiny_hf
    error = assert_error(import_checkpoint(client, b"\x00garbage" * 100, config), 422, "safetensors")
    assert str(data_dir(client)) not in error["message"] and ".staging" not in error["message"], error


@pytest.mark.both_databases
@pytest.mark.parametrize("method, url, params", [
    ("get", "/v1/checkpoints/ckpt_%00", None), ("get", "/v1/checkpoints/ckpt_%00/download", None),
    ("delete", "/v1/checkpoints/ckpt_%00", None), ("get", "/v1/checkpoints", {"job_id": "job_\x00"}),
    ("get", "/v1/checkpoints", {"after": "ckpt_\x00"})], ids=["get", "download", "delete", "list_job_id", "after"])
def test_nul_characters_are_not_a_500(api, method, url, params):
    response = getattr(lenient(api), method)(url, **({"params": params} if params else {}))
    assert response.status_code < 500, response.text


@pytest.fixture
def no_model_is_built(monkeypatch):
    from model import GPT

    def refuse(*_args, **_kwargs):
        raise AssertionError("a GPT was built")

    monkeypatch.setattr(GPT, "__init__", refuse)


def test_more_layers_than_the_weights_hold_is_422_before_a_model_is_built(client, tiny_hf, no_model_is_built):
    _, weights, config = tiny_hf
    error = assert_error(import_checkpoint(client, weights, {**config, "n_layer": 20000}), 422,
                         "n_layer is 20000", "2 blocks", param="config")
    assert str(data_dir(client)) not in error["message"], error
    assert_nothing_imported(client)


def test_an_absurd_context_is_422_naming_the_field_without_a_trace(client, tiny_hf, no_model_is_built):
    _, weights, config = tiny_hf
    error = assert_error(import_checkpoint(client, weights, {**config, "n_positions": 2**70}), 422,
                         "n_positions", "wpe.weight", param="weights")
    assert str(data_dir(client)) not in error["message"] and "c10" not in error["message"], error
    assert_nothing_imported(client)
