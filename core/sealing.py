"""Secrets the service keeps for a job to use later (a judge's API key, sent by the worker that runs the
evaluation), stored encrypted: the database, its backups and whoever reads a job's spec never see them.

Fernet (AES in CBC mode with an HMAC) under a key derived from SCRATCHLLM_SECRET_KEY, or from a random secret
made once in the data dir, which the API and the workers share.
"""

import base64
import contextlib
import os
import secrets
import uuid
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from core.settings import Settings

PURPOSE = b"scratchllm: secrets kept in the database"  # a key derived for this use only


def seal(settings: Settings, secret: str) -> str:
    return _fernet(settings).encrypt(secret.encode()).decode()


def unseal(settings: Settings, sealed: str) -> str:
    try:
        return _fernet(settings).decrypt(sealed).decode()
    except InvalidToken as e:
        raise ValueError("a stored secret cannot be decrypted: the secret key (SCRATCHLLM_SECRET_KEY, or "
                         "secret.key in the data dir) changed since it was stored") from e


def _fernet(settings: Settings) -> Fernet:
    secret = (settings.secret_key.get_secret_value() if settings.secret_key is not None
              else _data_dir_secret(settings.storage.secret_key_file))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PURPOSE).derive(secret.encode())
    return Fernet(base64.urlsafe_b64encode(key))


def _data_dir_secret(path: Path) -> str:
    if not path.exists():
        _create_once(path, secrets.token_urlsafe(32))
    return path.read_text().strip()


def _create_once(path: Path, content: str) -> None:
    """Writes path unless it exists. Written aside and then linked into place, so that a process that loses the
    race to make it (the API and a worker starting together) reads the winner's whole secret, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}")
    descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # for the service's user only
    with os.fdopen(descriptor, "w") as file:
        file.write(content)
    try:
        with contextlib.suppress(FileExistsError):  # another process made it first: its secret is the one
            os.link(aside, path)
    finally:
        aside.unlink()
