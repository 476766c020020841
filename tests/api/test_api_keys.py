import subprocess
import sys

import pytest


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_open_until_the_first_key_then_every_endpoint_but_health_needs_one(api):
    assert api.get("/v1/corpora").status_code == 200
    created = api.post("/v1/api-keys", json={"name": "ops", "scope": "admin"})
    assert created.status_code == 201, created.text
    admin = created.json()["key"]
    assert admin.startswith("sk-scratch-") and created.json()["prefix"] == admin[:15]
    for path in ("/v1/corpora", "/v1/jobs", "/v1/checkpoints", "/v1/api-keys"):
        response = api.get(path)
        assert response.status_code == 401 and "API key" in response.json()["error"]["message"], path
    assert api.get("/health").status_code == 503 and api.get("/livez").status_code == 200  # no key needed
    assert api.get("/v1/corpora", headers=bearer(admin)).status_code == 200
    assert api.get("/v1/corpora", headers=bearer("sk-scratch-wrong")).status_code == 401
    assert api.get("/v1/corpora", headers={"Authorization": "Basic abc"}).status_code == 401


def test_scopes_read_train_admin(api):
    admin = api.post("/v1/api-keys", json={"name": "root", "scope": "admin"}).json()["key"]
    read = api.post("/v1/api-keys", json={"name": "viewer", "scope": "read"}, headers=bearer(admin)).json()["key"]
    train = api.post("/v1/api-keys", json={"name": "trainer", "scope": "train"}, headers=bearer(admin)).json()["key"]
    assert api.get("/v1/jobs", headers=bearer(read)).status_code == 200
    upload = {"data": {"kind": "text"}, "files": {"file": ("a.txt", b"hello\n")}}
    denied = api.post("/v1/corpora", headers=bearer(read), **upload)
    assert denied.status_code == 403 and "'read'" in denied.json()["error"]["message"]
    assert api.post("/v1/corpora", headers=bearer(train), **upload).status_code == 201
    assert api.get("/v1/api-keys", headers=bearer(train)).status_code == 403
    listed = api.get("/v1/api-keys", headers=bearer(admin)).json()["data"]
    assert {k["name"] for k in listed} == {"root", "viewer", "trainer"}
    assert all("key" not in k for k in listed)  # never shown again


def test_revoked_keys_stop_working_and_keys_are_stored_hashed(api):
    admin = api.post("/v1/api-keys", json={"name": "root", "scope": "admin"}).json()
    other = api.post("/v1/api-keys", json={"name": "tmp", "scope": "read"}, headers=bearer(admin["key"])).json()
    revoked = api.delete(f"/v1/api-keys/{other['id']}", headers=bearer(admin["key"]))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert api.get("/v1/jobs", headers=bearer(other["key"])).status_code == 401
    assert api.delete(f"/v1/api-keys/{other['id']}", headers=bearer(admin["key"])).status_code == 409
    from sqlalchemy import select

    from core.db import Database
    from core.tables import ApiKey

    database = Database(api.app.state.services.settings.sqlalchemy_url)
    with database.session() as session:
        stored = session.scalars(select(ApiKey.key_hash)).all()
    database.dispose()
    assert admin["key"] not in stored and len(stored[0]) == 64


@pytest.mark.parametrize("body", [{"name": "", "scope": "admin"}, {"name": "x", "scope": "root"}, {"scope": "read"},
                                  {"name": "x", "extra": 1}])
def test_invalid_key_requests(api, body):
    response = api.post("/v1/api-keys", json=body)
    assert response.status_code == 422 and response.json()["error"]["param"]


def test_cli_creates_a_key_when_keys_are_required(tmp_path):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from core.migrate import upgrade
    from core.settings import Settings

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    settings = Settings(data_dir=tmp_path / "data", database_url=url, api_keys_required=True)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/jobs").status_code == 401  # required even before any key exists
        env = {"SCRATCHLLM_DATABASE_URL": url, "SCRATCHLLM_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin"}
        out = subprocess.run([sys.executable, "-m", "scratchllm", "keys", "create", "--name", "bootstrap"], env=env,
                             capture_output=True, text=True, check=True).stdout
        key = out.strip().splitlines()[-1]
        assert client.get("/v1/jobs", headers=bearer(key)).status_code == 200
