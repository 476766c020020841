"""Bounded requests: body sizes, JSON nesting, multipart forms."""

import json

import pytest

from tests.helpers import assert_error

DEEP = "[" * 100_000  # nested past the interpreter's recursion limit


def test_a_body_over_the_cap_is_refused_as_it_arrives(api):
    limit = api.app.state.services.settings.max_request_bytes
    big = json.dumps({"inputs": "x" * limit})
    for path in ("/generate", "/v1/completions", "/v1/jobs", "/v1/deployments"):
        assert_error(api.post(path, content=big, headers={"content-type": "application/json"}), 413,
                     f"{limit:,} bytes")

    def chunks():  # no Content-Length: counted as it comes
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    assert_error(api.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_an_upload_keeps_its_own_larger_limit(api):
    settings = api.app.state.services.settings
    text = b"every effort moves you\n" * (settings.max_request_bytes // 20)
    assert settings.max_request_bytes < len(text) < settings.max_upload_bytes
    response = api.post("/v1/corpora", data={"kind": "text"}, files={"file": ("big.txt", text)})
    assert response.status_code == 201, response.text
    too_big = b"x" * (settings.max_upload_bytes + 1)
    assert_error(api.post("/v1/corpora", data={"kind": "text"}, files={"file": ("huge.txt", too_big)}), 413,
                 "upload limit")


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions",
                                  "/v1/jobs", "/v1/evaluations", "/v1/deployments"])
def test_json_nested_too_deeply_is_a_4xx(api, path):
    response = api.post(path, content=DEEP, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text


def test_an_instruction_file_nested_too_deeply_is_refused(api):
    for name, content in (("deep.json", DEEP), ("deep.jsonl", DEEP + "\n")):
        response = api.post("/v1/corpora", data={"kind": "instruction"}, files={"file": (name, content.encode())})
        assert_error(response, 422, "nested too deeply", param="file")


def test_an_import_config_nested_too_deeply_is_refused(api, tmp_path):
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "model.safetensors"
    save_file({"wte.weight": torch.zeros(2, 2)}, str(weights))
    response = api.post("/v1/checkpoints/import", files={"weights": ("model.safetensors", weights.read_bytes()),
                                                         "config": ("config.json", DEEP.encode())})
    assert_error(response, 422, "not valid JSON", param="config")


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, dict]:
    body = b"".join(f"--{boundary}\r\n".encode() + head.encode() + b"\r\n\r\n" + value + b"\r\n"
                    for head, value in parts) + f"--{boundary}--\r\n".encode()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_a_form_with_too_many_parts_or_endless_headers_is_refused(api):
    field = 'Content-Disposition: form-data; name="kind"'
    body, headers = _multipart([(field, b"text")] * 100)
    assert_error(api.post("/v1/corpora", content=body, headers=headers), 413, "parts")
    body, headers = _multipart([(field + "\r\nX-Padding: " + "a" * 100_000, b"text")])
    assert_error(api.post("/v1/corpora", content=body, headers=headers), 400, "header size")  # python-multipart's cap
    assert api.app.state.services.settings.data_dir.joinpath("corpora").exists() is False or not any(
        p.is_file() for p in api.app.state.services.settings.data_dir.joinpath("corpora").rglob("*"))
