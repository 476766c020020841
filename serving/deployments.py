"""Which checkpoint each deployment serves, in this API process: one inference engine per loaded checkpoint.

The deployments table is the truth and every API process follows it, so a change made through one replica
reaches the others within a sync interval. Switching a deployment loads the new checkpoint in the
background; requests keep going to the old engine until the new one is ready, and in-flight streams
finish on the engine they started on. If the new checkpoint fails to load, the old one stays served and
the deployment shows why.
"""

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select

from core.db import Database
from core.enums import CheckpointTask
from core.storage import DataDir
from core.tables import Checkpoint, Deployment
from model import ConfigError, GPTConfig, load_checkpoint, merge_lora
from model.linear import pack_linears
from model.memory import human_bytes, serving_bytes, weight_bytes
from serving.engine import Engine
from serving.metrics import ServingMetrics
from serving.placement import Budget, Placement, PlacementError, resolve

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 300  # an old engine is stopped once its streams end, or after this


def memory_estimate(model_config: dict, task: str, max_batch: int, placement: Placement) -> int:
    """The bytes a deployment of this checkpoint holds on its device: weights and, where the engine keeps one,
    their packed copy, and for a language model the KV cache for max_batch sequences of its whole context,
    which the engine allocates up front."""
    config = GPTConfig.from_dict(model_config)
    if task == CheckpointTask.LM:
        return serving_bytes(config, max_batch, placement.dtype_bytes, placement.packs_weights)
    # classifiers keep packed copies of their linear layers where they can (pack_linears)
    return (1 + placement.packs_weights) * weight_bytes(config, placement.dtype_bytes)


def over_budget(checkpoint_id: str, placement: Placement, estimate: int, others: int, budget: Budget) -> str | None:
    """Why a deployment needing `estimate` bytes does not fit beside the `others` bytes the deployments on the
    same device hold already; None if it does."""
    if estimate + others <= budget.bytes:
        return None
    return (f"checkpoint {checkpoint_id} needs about {human_bytes(estimate)} to serve on {placement} (weights "
            f"and the KV cache for serving_max_batch sequences of its whole context); with the "
            f"{human_bytes(others)} the other deployments on {placement.device} hold, that is past the limit of "
            f"{human_bytes(budget.bytes)} ({budget.source})")


class DeploymentState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class Loaded:
    checkpoint_id: str
    placement: Placement
    engine: Engine | None  # None for classifiers: they run on the request's thread pool
    model: object
    tokenizer: object
    meta: dict
    prompt_format: str | None
    memory_bytes: int = 0  # memory_estimate of it


@dataclass
class Served:
    name: str
    checkpoint_id: str  # what the table says it should serve
    is_default: bool
    state: DeploymentState = DeploymentState.LOADING
    error: str | None = None
    current: Loaded | None = None  # what it serves now (the previous checkpoint while a new one loads)
    loading: tuple[str, Placement] | None = None  # the checkpoint loading, and where
    attempted_on: Placement | None = None  # where checkpoint_id was last tried: a failure there is not retried
    loading_bytes: int = 0  # memory_estimate of the checkpoint loading

    def memory_on(self, device) -> int:
        """What it holds on a device now: the checkpoint it serves and the one loading (both are in memory
        during a switch)."""
        held = self.current.memory_bytes if self.current and self.current.placement.device == device else 0
        return held + (self.loading_bytes if self.loading and self.loading[1].device == device else 0)


class NotServing(Exception):
    """A request for a deployment that cannot be answered now; the API gives each reason its status."""

    class Reason(StrEnum):
        MISSING = "missing"  # no deployment of that name
        NO_DEFAULT = "no_default"  # no name given, and no default deployment
        LOADING = "loading"  # its checkpoint is not loaded (yet, or it failed to load)
        WRONG_TASK = "wrong_task"  # it serves a classifier to a generation request, or the other way round

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


class DeploymentManager:
    def __init__(self, database: Database, storage: DataDir, max_batch: int, max_queue: int,
                 metrics: ServingMetrics, max_memory_bytes: int, gpu_memory_fraction: float):
        self.database, self.storage, self.metrics = database, storage, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_memory_bytes, self.gpu_memory_fraction = max_memory_bytes, gpu_memory_fraction
        self.served: dict[str, Served] = {}
        self.retiring: list[tuple[Loaded, float]] = []  # engines replaced, finishing their streams
        self._lock = threading.Lock()

    def budget(self, placement: Placement) -> Budget:
        return Budget.of(placement, self.max_memory_bytes, self.gpu_memory_fraction)

    def sync(self) -> None:
        """Bring this process in line with the deployments table (called periodically and after changes)."""
        with self.database.session() as session:
            rows = session.execute(select(Deployment.name, Deployment.checkpoint_id, Deployment.is_default,
                                          Deployment.device, Deployment.dtype, Checkpoint.path,
                                          Checkpoint.prompt_format, Checkpoint.model_config, Checkpoint.task)
                                   .join(Checkpoint, Checkpoint.id == Deployment.checkpoint_id)
                                   .order_by(Deployment.id)).all()
        wanted = {row.name: row for row in rows}
        with self._lock:
            for name in set(self.served) - set(wanted):
                self._retire(self.served.pop(name).current)
            for name, row in wanted.items():
                served = self.served.get(name)
                if served is None:
                    served = self.served[name] = Served(name, row.checkpoint_id, row.is_default)
                served.is_default = row.is_default
                self._follow(served, row)
            self._stop_drained()

    def _follow(self, served: Served, row) -> None:
        """Start loading what the row asks this deployment to serve, unless it is served or loading already."""
        try:
            placement = resolve(row.device, row.dtype)
        except PlacementError as e:  # a device this API process does not have
            served.checkpoint_id = row.checkpoint_id
            self._refuse(served, f"not loading checkpoint {row.checkpoint_id}: {e}")
            return
        wanted = (row.checkpoint_id, placement)
        current = served.current
        already = current is not None and (current.checkpoint_id, current.placement) == wanted
        if already or served.loading == wanted or (
                served.state == DeploymentState.FAILED and (served.checkpoint_id, served.attempted_on) == wanted):
            return
        served.checkpoint_id, served.error, served.attempted_on = row.checkpoint_id, None, placement
        try:
            estimate = memory_estimate(row.model_config, row.task, self.max_batch, placement)
        except ConfigError as e:  # rows are checked when written; one that is not must not stop the sync
            self._refuse(served, f"checkpoint {row.checkpoint_id} has an unusable model config: {e}")
            return
        # Its own current checkpoint is not counted: it is let go once the new one is ready.
        others = sum(s.memory_on(placement.device) for s in self.served.values() if s is not served)
        refusal = over_budget(row.checkpoint_id, placement, estimate, others, self.budget(placement))
        if refusal is not None:  # a stored deployment past a limit lowered since: failed, not loaded
            self._refuse(served, f"not loading checkpoint {row.checkpoint_id}: {refusal}")
            return
        served.loading, served.loading_bytes = wanted, estimate
        served.state = DeploymentState.LOADING if served.current is None else served.state
        threading.Thread(target=self._load, args=(served, row.checkpoint_id, placement, row.path,
                                                  row.prompt_format, estimate),
                         name=f"load-{served.name}", daemon=True).start()

    @staticmethod
    def _refuse(served: Served, error: str) -> None:
        """The checkpoint is not loaded; what is served (if anything) stays served."""
        served.error = error
        if served.current is None:
            served.state = DeploymentState.FAILED

    def _load(self, served: Served, checkpoint_id: str, placement: Placement, path: str, prompt_format: str | None,
              memory_bytes: int) -> None:
        try:
            model, tokenizer, meta = load_checkpoint(self.storage.checkpoint_dir(path))
            merge_lora(model)  # in float32, on the CPU, before the model moves
            model.to(device=placement.device, dtype=placement.dtype)
            engine = None
            if meta["task"] == CheckpointTask.LM:
                engine = Engine(model, tokenizer, self.max_batch, self.max_queue).start()
            else:
                pack_linears(model)  # classification runs batches of texts
            loaded = Loaded(checkpoint_id, placement, engine, model, tokenizer, meta, prompt_format, memory_bytes)
        except Exception as e:  # any failure to load leaves the previous checkpoint served
            log.exception("deployment %s: loading checkpoint %s failed", served.name, checkpoint_id)
            self.metrics.load_failures.labels(served.name).inc()
            with self._lock:
                if served.loading == (checkpoint_id, placement):
                    served.loading, served.loading_bytes = None, 0
                    served.error = f"loading checkpoint {checkpoint_id} on {placement} failed: {e}"
                    served.state = DeploymentState.FAILED if served.current is None else DeploymentState.READY
            return
        with self._lock:
            if served.loading != (checkpoint_id, placement) or self.served.get(served.name) is not served:
                self._retire(loaded)  # superseded while it loaded
                return
            self._retire(served.current)
            served.current, served.loading, served.loading_bytes = loaded, None, 0
            served.state, served.error = DeploymentState.READY, None

    def _retire(self, loaded: Loaded | None) -> None:
        if loaded is not None and loaded.engine is not None:
            self.retiring.append((loaded, time.monotonic()))

    def _stop_drained(self) -> None:
        keep = []
        for loaded, since in self.retiring:
            if loaded.engine.load == (0, 0) or time.monotonic() - since > DRAIN_TIMEOUT_S:
                threading.Thread(target=loaded.engine.stop, daemon=True).start()
            else:
                keep.append((loaded, since))
        self.retiring = keep

    def get(self, name: str | None) -> Served | None:
        with self._lock:
            if name is None:
                return next((s for s in self.served.values() if s.is_default), None)
            return self.served.get(name)

    def all(self) -> list[Served]:
        with self._lock:
            return list(self.served.values())

    def engines(self) -> list[tuple[str, Engine]]:
        """(deployment name, engine) of every language model served now."""
        return [(s.name, s.current.engine) for s in self.all() if s.current is not None and s.current.engine]

    def serving(self, name: str | None, task: CheckpointTask) -> Served:
        """The deployment (the default one without a name), loaded, and serving a model of this task."""
        served = self.get(name)
        if served is None:
            if name is None:
                raise NotServing(NotServing.Reason.NO_DEFAULT, "no default deployment")
            raise NotServing(NotServing.Reason.MISSING, f"no deployment named {name!r}")
        if served.current is None:
            raise NotServing(NotServing.Reason.LOADING, served.error or f"deployment {served.name} is still loading "
                                                                       f"checkpoint {served.checkpoint_id}")
        if served.current.meta["task"] != task:
            other = "/classify" if task == CheckpointTask.LM else "/generate or /v1/completions"
            kind = "a classifier" if task == CheckpointTask.LM else "a language model"
            raise NotServing(NotServing.Reason.WRONG_TASK, f"deployment {served.name} serves {kind}: use {other}")
        return served

    def stop(self) -> None:
        with self._lock:
            for served in self.served.values():
                if served.current is not None and served.current.engine is not None:
                    served.current.engine.stop()
            for loaded, _ in self.retiring:
                loaded.engine.stop()


async def follow_deployments(manager: DeploymentManager, settings) -> None:
    """Keep this process's engines in line with the table, whichever API process changed it."""
    while True:
        try:
            await asyncio.to_thread(manager.sync)
        except Exception:  # the database is away for a moment: try again next round
            log.exception("syncing deployments failed")
        await asyncio.sleep(settings.deployment_sync_interval_s)
