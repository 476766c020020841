"""Settings from environment variables prefixed SCRATCHLLM_ (see the README for the list)."""

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.storage import DataDir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCRATCHLLM_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("scratchllm-data"), description="corpora, token files and checkpoints")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in the data dir")
    broker_url: str | None = Field(None, description="Celery broker; default: a folder in the data dir")
    training_queue: str = "gpu"
    max_upload_bytes: int = Field(2 * 1024**3, gt=0)
    api_keys_required: bool = Field(False, description="refuse requests without a key even before one exists")
    worker_concurrency: int = Field(1, ge=1, description="jobs at once per worker: one per GPU")
    worker_soft_shutdown_s: float = Field(60.0, gt=0)
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_timeout_s: float = Field(60.0, gt=0, description="a running job silent this long is re-queued")
    broker_polling_interval_s: float = Field(0.1, gt=0)
    serving_max_batch: int = Field(8, ge=1, le=256, description="sequences decoded together per deployment")
    serving_max_queue: int = Field(64, ge=0, description="requests waiting per deployment before 429")
    generation_timeout_s: float = Field(300.0, gt=0, description="a generation request waits this long for a token")
    deployment_sync_interval_s: float = Field(2.0, gt=0, description="how soon a change reaches other API processes")

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def storage(self) -> DataDir:
        return DataDir(self.data_dir)

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.storage.database_file}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"


@lru_cache
def settings_from_environment() -> Settings:
    """The process's settings, read once."""
    return Settings()
