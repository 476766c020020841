"""Assertions shared by the API tests."""

from fastapi.testclient import TestClient


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


def lenient(api) -> TestClient:
    """A client on the same running app that answers a server error as a 500 response instead of raising it."""
    return TestClient(api.app, raise_server_exceptions=False)
