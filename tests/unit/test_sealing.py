"""Secrets kept in the database (a judge's API key) are encrypted, under a key both the API and the workers
find."""

import os

import pytest

from core.sealing import seal, unseal
from core.settings import Settings


def test_secrets_are_sealed_with_a_key_made_once_in_the_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path)
    sealed = seal(settings, "sk-judge-secret")
    assert "sk-judge-secret" not in sealed and unseal(Settings(data_dir=tmp_path), sealed) == "sk-judge-secret"
    assert os.stat(settings.storage.secret_key_file).st_mode & 0o777 == 0o600
    assert list(tmp_path.iterdir()) == [settings.storage.secret_key_file]  # nothing left aside
    with pytest.raises(ValueError, match="changed since"):
        unseal(Settings(data_dir=tmp_path / "other"), sealed)


def test_a_configured_secret_key_seals_without_the_data_dir(tmp_path):
    sealed = seal(Settings(data_dir=tmp_path / "api", secret_key="configured"), "sk-judge-secret")
    assert unseal(Settings(data_dir=tmp_path / "worker", secret_key="configured"), sealed) == "sk-judge-secret"
    assert not (tmp_path / "api").exists()
