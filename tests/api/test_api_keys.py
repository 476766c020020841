"""Who may do what: keys and scopes, the open mode for one local user, and what stays public."""

import socket
import subprocess
import sys
import time

import pytest
from fastapi.testclient import TestClient

from app.auth import PUBLIC_PATHS
from tests.helpers import assert_error, create_api_key, serving


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(migrated_database_url, tmp_path):
    """The service as deployed: keys required (the default), called from another host."""
    from app.main import create_app
    from core.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", database_url=migrated_database_url)
    assert settings.api_keys_required
    with TestClient(create_app(settings), base_url="http://scratchllm.example") as client:
        yield client


def test_keys_are_required_by_default_even_before_the_first_exists(keyed):
    for path in ("/v1/corpora", "/v1/jobs", "/v1/checkpoints", "/v1/deployments", "/v1/api-keys", "/metrics",
                 "/info", "/v1/models"):
        assert_error(keyed.get(path), 401, "API key")
    assert_error(keyed.post("/generate", json={"inputs": "x"}), 401, "API key")
    assert_error(keyed.get("/v1/jobs", headers={"Authorization": "Basic abc"}), 401, "malformed")
    assert_error(keyed.get("/v1/jobs", headers=bearer("sk-scratch-wrong")), 401, "unknown")
    key = create_api_key(keyed.app, "read")
    assert keyed.get("/v1/jobs", headers=bearer(key)).status_code == 200


def test_no_anonymous_request_creates_a_key_in_any_mode(api, keyed):
    for client in (api, keyed):
        assert_error(client.post("/v1/api-keys", json={"name": "me", "scope": "admin"}), 401,
                     "scratchllm keys create")
        assert_error(client.get("/v1/api-keys"), 401)


def test_public_endpoints_answer_without_a_key_and_name_nothing(keyed):
    assert keyed.get("/livez").json() == {"status": "ok"}
    assert keyed.get("/openapi.json").status_code == 200 and keyed.get("/docs").status_code == 200
    health = keyed.get("/health")
    assert health.status_code == 503 and health.json()["error"]["message"] == "no default deployment"


def test_the_openapi_document_declares_the_key_and_the_only_503s(keyed):
    document = keyed.get("/openapi.json").json()
    scheme = document["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer") and "scope" in scheme["description"]
    operations = [(method.upper(), path, operation) for path, methods in document["paths"].items()
                  for method, operation in methods.items()]
    for _, path, operation in operations:
        secured = operation.get("security") == [{"apiKey": []}]
        assert secured != (path in PUBLIC_PATHS), path
        assert secured == ({"401", "403"} <= set(operation["responses"])), path
    serving = {"POST /generate", "POST /generate_stream", "POST /", "GET /info", "POST /classify",
               "POST /v1/completions", "POST /v1/chat/completions"}
    assert {f"{method} {path}" for method, path, operation in operations if "503" in operation["responses"]} == {
        "GET /health", "POST /v1/jobs", "POST /v1/evaluations", *serving,
        *(f"{route.split()[0]} /d/{{deployment}}{route.split()[1]}" for route in serving if "/v1/" not in route
          and "classify" not in route),
        "POST /tokenize", "POST /detokenize", "POST /d/{deployment}/tokenize"}  # vLLM's and TGI's tokenizers


def test_the_dashboard_is_public_but_what_it_calls_is_not(keyed):
    page = keyed.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"] and "/ui/app.js" in page.text
    for asset in ("/ui/app.js", "/ui/style.css", "/ui/vendor/uplot/uPlot.iife.min.js", "/ui/vendor/uplot/LICENSE"):
        assert keyed.get(asset).status_code == 200, asset
    assert_error(keyed.post("/", json={"inputs": "x"}), 401)  # TGI's POST / is generation: it needs a key
    assert_error(keyed.get("/v1/me"), 401)
    for outside in ("/ui/%2e%2e/auth.py", "/ui/..%2Frouters%2Fkeys.py", "/ui/vendor/%2e%2e/%2e%2e/main.py"):
        assert keyed.get(outside).status_code == 404, outside  # nothing beyond the dashboard's folder
    reader = create_api_key(keyed.app, "read", name="a reader")
    assert keyed.get("/v1/me", headers=bearer(reader)).json() == {
        "object": "caller", "scope": "read", "key_name": "a reader", "open_mode": False}


def test_open_mode_answers_only_local_requests_to_a_local_host(api):
    assert api.get("/v1/corpora").status_code == 200
    app = api.app
    for base_url, client in (("http://evil.example", ("127.0.0.1", 5000)),  # DNS rebinding: a foreign Host
                             ("http://127.0.0.1", ("10.1.2.3", 5000)),  # another machine claiming localhost
                             ("http://127.0.0.1.nip.io", ("127.0.0.1", 5000))):
        other = TestClient(app, base_url=base_url, client=client)
        assert_error(other.get("/v1/corpora"), 403, "localhost")
        assert_error(other.post("/generate", json={"inputs": "x"}), 403, "localhost")
        assert other.get("/livez").status_code == 200
    for base_url in ("http://localhost:8000", "http://[::1]:8000", "http://127.0.0.5"):
        assert TestClient(app, base_url=base_url, client=("::1", 5000)).get("/v1/jobs").status_code == 200


def test_open_mode_ignores_an_unknown_key_but_not_an_insufficient_admin_request(api):
    assert api.get("/v1/jobs", headers=bearer("sk-anything")).status_code == 200  # OpenAI's client sends one
    read = create_api_key(api.app, "read")
    assert_error(api.get("/v1/api-keys", headers=bearer(read)), 403, "'read'")
    admin = create_api_key(api.app, "admin")
    assert api.get("/v1/api-keys", headers=bearer(admin)).status_code == 200


def test_scopes_read_train_deploy_admin(keyed, lm):
    from tests.helpers import add_checkpoint

    keys = {scope: create_api_key(keyed.app, scope, scope) for scope in ("read", "train", "deploy", "admin")}
    upload = {"data": {"kind": "text"}, "files": {"file": ("a.txt", b"hello there\n" * 20)}}
    assert keyed.get("/v1/jobs", headers=bearer(keys["read"])).status_code == 200
    assert_error(keyed.post("/v1/corpora", headers=bearer(keys["read"]), **upload), 403, "'read'", "'train'")
    corpus = keyed.post("/v1/corpora", headers=bearer(keys["train"]), **upload).json()["id"]
    checkpoint = add_checkpoint(keyed, lm)
    deployment = {"name": "tiny", "checkpoint_id": checkpoint}
    # changing what is served and deleting data need `deploy`
    assert_error(keyed.post("/v1/deployments", json=deployment, headers=bearer(keys["train"])), 403, "'deploy'")
    assert_error(keyed.delete(f"/v1/corpora/{corpus}", headers=bearer(keys["train"])), 403, "'deploy'")
    assert_error(keyed.delete(f"/v1/checkpoints/{checkpoint}", headers=bearer(keys["train"])), 403, "'deploy'")
    assert keyed.post("/v1/deployments", json=deployment, headers=bearer(keys["deploy"])).status_code == 201
    assert_error(keyed.patch("/v1/deployments/tiny", json={"default": True}, headers=bearer(keys["train"])), 403)
    assert keyed.delete("/v1/deployments/tiny", headers=bearer(keys["deploy"])).status_code == 200
    assert keyed.delete(f"/v1/corpora/{corpus}", headers=bearer(keys["deploy"])).status_code == 200
    # keys need `admin`
    assert_error(keyed.get("/v1/api-keys", headers=bearer(keys["deploy"])), 403, "'admin'")
    listed = keyed.get("/v1/api-keys", headers=bearer(keys["admin"])).json()["data"]
    assert {k["scope"] for k in listed} == {"read", "train", "deploy", "admin"}
    assert all("key" not in k for k in listed)  # never shown again
    made = keyed.post("/v1/api-keys", json={"name": "ci", "scope": "train"}, headers=bearer(keys["admin"]))
    assert made.status_code == 201 and made.json()["key"].startswith("sk-scratch-")
    assert keyed.get("/metrics", headers=bearer(keys["read"])).status_code == 200


def test_the_last_admin_key_cannot_be_revoked_and_keys_are_stored_hashed(keyed):
    first, second = create_api_key(keyed.app, "admin", "a"), create_api_key(keyed.app, "admin", "b")
    ids = {k["name"]: k["id"] for k in keyed.get("/v1/api-keys", headers=bearer(first)).json()["data"]}
    reader = keyed.post("/v1/api-keys", json={"name": "r", "scope": "read"}, headers=bearer(first)).json()
    assert keyed.delete(f"/v1/api-keys/{reader['id']}", headers=bearer(first)).status_code == 200
    assert_error(keyed.get("/v1/jobs", headers=bearer(reader["key"])), 401, "revoked")
    assert_error(keyed.delete(f"/v1/api-keys/{reader['id']}", headers=bearer(first)), 409, "already revoked")
    revoked = keyed.delete(f"/v1/api-keys/{ids['b']}", headers=bearer(first))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert_error(keyed.get("/v1/jobs", headers=bearer(second)), 401)
    assert_error(keyed.delete(f"/v1/api-keys/{ids['a']}", headers=bearer(first)), 409, "last admin key")
    assert keyed.get("/v1/jobs", headers=bearer(first)).status_code == 200  # still the admin

    from sqlalchemy import select

    from core.tables import ApiKey

    with keyed.app.state.services.database.session() as session:
        stored = session.scalars(select(ApiKey.key_hash)).all()
    assert first not in stored and all(len(h) == 64 for h in stored)


@pytest.mark.parametrize("body", [{"name": "", "scope": "admin"}, {"name": "x", "scope": "root"}, {"scope": "read"},
                                  {"name": "x", "extra": 1}])
def test_invalid_key_requests(keyed, body):
    admin = create_api_key(keyed.app, "admin")
    response = keyed.post("/v1/api-keys", json=body, headers=bearer(admin))
    assert response.status_code == 422 and response.json()["error"]["param"]


def test_an_anonymous_request_is_refused_before_its_body_is_read(keyed):
    """A client that announces 300 MB gets its 401 at once, without sending a byte of it."""
    with serving(keyed.app) as url:
        port = int(url.rsplit(":", 1)[1])
        for path in ("/v1/api-keys", "/v1/corpora", "/generate"):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                connection.sendall(f"POST {path} HTTP/1.1\r\nHost: scratchllm.example\r\nContent-Type: "
                                   f"application/json\r\nContent-Length: {300 * 1024**2}\r\n\r\n".encode())
                answer = connection.recv(4096).decode()
            assert answer.startswith("HTTP/1.1 401"), answer


def test_the_cli_creates_keys_of_every_scope(keyed, tmp_path):
    settings = keyed.app.state.services.settings
    env = {"SCRATCHLLM_DATABASE_URL": settings.sqlalchemy_url, "SCRATCHLLM_DATA_DIR": str(settings.data_dir),
           "PATH": "/usr/bin"}
    out = subprocess.run([sys.executable, "-m", "scratchllm", "keys", "create", "--name", "ops", "--scope", "deploy"],
                         env=env, capture_output=True, text=True, check=True).stdout
    key = out.strip().splitlines()[-1]
    assert "deploy key" in out and keyed.get("/v1/jobs", headers=bearer(key)).status_code == 200


def test_open_mode_is_refused_off_loopback(tmp_path):
    env = {"SCRATCHLLM_DATA_DIR": str(tmp_path / "data"), "SCRATCHLLM_API_KEYS_REQUIRED": "false",
           "PATH": "/usr/bin"}
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "scratchllm", "api", "--host", "0.0.0.0", "--port", "1"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and "loopback" in run.stderr and time.monotonic() - started < 60

