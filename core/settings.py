"""Settings from environment variables prefixed SCRATCHLLM_ (see the README for the list)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.outbound import host_and_port
from core.storage import DataDir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCRATCHLLM_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("scratchllm-data"), description="corpora, token files and checkpoints")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in the data dir")
    broker_url: str | None = Field(None, description="Celery broker; default: a folder in the data dir")
    training_queue: str = "gpu"
    max_upload_bytes: int = Field(2 * 1024**3, gt=0)
    max_record_corpus_bytes: int = Field(256 * 1024**2, gt=0, description="the largest classification or "
                                         "instruction corpus: checked at upload and trained on whole, in memory")
    api_keys_required: bool = Field(True, description="false: no keys, for one user on this machine only (what "
                                                      "`scratchllm up` on a loopback address sets)")
    max_request_bytes: int = Field(1024**2, gt=0, description="the largest request body but an upload's")
    max_connections: int = Field(512, ge=1, description="concurrent connections the API serves; past it, 503")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description=(
        "what the API and the worker log; `scratchllm up` writes it to logs/scratchllm.log in the data dir"))
    worker_concurrency: int = Field(1, ge=1, description="jobs at once per worker; its GPUs are shared out among "
                                    "them, and a job's devices take several")
    worker_soft_shutdown_s: float = Field(60.0, gt=0)
    distributed_timeout_s: float = Field(600.0, gt=0, description=(
        "how long the ranks of a job on several devices wait for each other (a collective, rank 0 writing a "
        "checkpoint) before the job fails"))
    node_address: str | None = Field(None, max_length=253, description=(
        "the address the workers of other machines reach this one at: jobs across several machines (`nodes`) "
        "meet at the worker that runs their part 0"))
    distributed_interface: str | None = Field(None, max_length=15, description=(
        "the network interface the ranks of a job across machines talk over (GLOO_SOCKET_IFNAME, "
        "NCCL_SOCKET_IFNAME); default: the one the host name resolves to"))
    heartbeat_interval_s: float = Field(5.0, gt=0)
    heartbeat_timeout_s: float = Field(60.0, gt=0, description="a running job silent this long is re-queued")
    max_attempts: int = Field(3, ge=1, description="a job starts at most this often: one whose worker went silent "
                              "on the last attempt (killed by the job, say out of memory) fails instead")
    resend_queued_after_s: float = Field(300.0, gt=0, description="a job still queued this long after it was sent "
                                         "is sent again: its broker message may be lost")
    broker_polling_interval_s: float = Field(0.1, gt=0)
    checkpoints_kept: int = Field(3, ge=0, description=(
        "a training job keeps its newest N checkpoints and its best by validation loss, and the optimizer state "
        "(for a resume) on its newest alone; a job's keep_checkpoints overrides it; 0 keeps every checkpoint"))
    serving_max_batch: int = Field(8, ge=1, le=256, description="sequences decoded together per deployment")
    max_training_memory_bytes: int = Field(16 * 1024**3, gt=0, description=(
        "a training job whose estimated memory (weights, gradients, AdamW state, one step's activations) is "
        "larger is refused (422)"))
    max_serving_memory_bytes: int = Field(8 * 1024**3, gt=0, description=(
        "the memory the deployments an API process serves on the CPU may hold together (weights and the KV cache for "
        "serving_max_batch sequences of the whole context); a deployment past it is refused (422), or fails at start"))
    serving_gpu_memory_fraction: float = Field(0.9, gt=0, le=1, description=(
        "the share of a GPU's memory the deployments on it may hold together; one past it is refused (422)"))
    serving_max_queue: int = Field(64, ge=0, description="requests waiting per deployment before 429")
    serving_max_prompt_chars: int = Field(32_768, ge=1, description="the longest prompt or text to classify, in "
                                          "characters: a longer one is refused (413) before it is tokenized")
    serving_max_classify_batches: int = Field(2, ge=1, description="classification batches run at once per "
                                              "deployment before 429")
    generation_timeout_s: float = Field(300.0, gt=0, description="a generation request waits this long for a token")
    deployment_sync_interval_s: float = Field(2.0, gt=0, description="how soon a change reaches other API processes")
    judge_allowed_hosts: list[str] = Field([], description=(
        "host[:port] entries (a JSON list) an evaluation's judge may reach although they resolve to loopback, "
        "private or link-local addresses: this service's own address, to judge with its own /v1/chat/completions "
        "(e.g. localhost:8000), or a judge on the local network; an entry without a port allows every port. "
        "Any other judge must resolve to public addresses only"))
    secret_key: SecretStr | None = Field(None, description=(
        "encrypts the secrets kept in the database (a judge's API key); the same on the API and the workers. "
        "Default: a random key made once in the data dir (secret.key); set it to keep the key out of the data dir"))

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("judge_allowed_hosts")
    @classmethod
    def _host_and_port(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            host_and_port(entry)
        return entries

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
