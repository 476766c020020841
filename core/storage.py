"""The data directory's layout: every path inside it is spelled here and nowhere else.

    scratchllm.db                       the embedded (SQLite) database
    secret.key                          encrypts the secrets in the database, unless SCRATCHLLM_SECRET_KEY is set
    broker/                             the embedded (filesystem) Celery broker
    corpora/<corpus id>/data.<format>   an uploaded corpus, under the format it was checked as
    checkpoints/<job id>/step-NNNNNNN/  a training job's checkpoints (the Trainer names the steps)
    checkpoints/imported/<checkpoint id>/   imported weights
    jobs/<job id>/                      a job's working files: token files, a trained tokenizer
    */.staging/                         uploads and imports being checked, before they are kept

Uploaded file names never become paths: every name here is an id the service made.
"""

import uuid
from pathlib import Path

STAGING = ".staging"


class DataDir:
    def __init__(self, root: Path):
        self.root = root

    @property
    def database_file(self) -> Path:
        return self.root / "scratchllm.db"

    @property
    def secret_key_file(self) -> Path:
        return self.root / "secret.key"

    @property
    def broker(self) -> Path:
        return self.root / "broker"

    @property
    def broker_control(self) -> Path:
        return self.broker / "control"

    @property
    def corpora(self) -> Path:
        return self.root / "corpora"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def corpus_dir(self, corpus_id: str) -> Path:
        return self.corpora / corpus_id

    def corpus_file(self, corpus_id: str, fmt: str) -> Path:
        return self.corpus_dir(corpus_id) / f"data.{fmt}"

    def job_work_dir(self, job_id: str) -> Path:
        return self.root / "jobs" / job_id

    def job_checkpoints_dir(self, job_id: str) -> Path:
        return self.checkpoints / job_id

    def imported_checkpoint_dir(self, checkpoint_id: str) -> Path:
        return self.checkpoints / "imported" / checkpoint_id

    def checkpoint_dir(self, relative_path: str) -> Path:
        """A checkpoint's directory from the path its row stores (relative to the data dir)."""
        return self.root / relative_path

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def staging_path(self, area: Path) -> Path:
        """A fresh path in the staging folder of corpora or checkpoints (its folder exists)."""
        folder = area / STAGING
        folder.mkdir(parents=True, exist_ok=True)
        return folder / uuid.uuid4().hex
