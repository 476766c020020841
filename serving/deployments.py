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
from dataclasses import dataclass, field
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import aliased

from core.db import Database
from core.enums import CheckpointTask
from core.storage import DataDir
from core.tables import Checkpoint, Deployment, DeploymentAdapter
from model import ConfigError, GPTConfig, load_adapter, load_checkpoint, merge_lora
from model.linear import pack_linears
from model.memory import human_bytes, serving_bytes, weight_bytes
from serving.engine import Engine
from serving.metrics import ServingMetrics
from serving.placement import Budget, Placement, PlacementError, resolve

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 300  # an old engine is stopped once its streams end, or after this


def memory_estimate(model_config: dict, task: str, max_batch: int, placement: Placement, adapter_bytes: int = 0
                    ) -> int:
    """The bytes a deployment of this checkpoint holds on its device: weights and, where the engine keeps one,
    their packed copy, and for a language model the KV cache for max_batch sequences of its whole context,
    which the engine allocates up front, and its adapters (adapter_bytes: their files' size)."""
    config = GPTConfig.from_dict(model_config)
    if task == CheckpointTask.LM:
        return serving_bytes(config, max_batch, placement.dtype_bytes, placement.packs_weights) + adapter_bytes
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


@dataclass(frozen=True)
class Wanted:
    """What a deployment is to serve: a checkpoint, where, and the adapters over it ((name, checkpoint id), by
    name)."""

    checkpoint_id: str
    placement: Placement
    adapters: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ServedAdapter:
    checkpoint_id: str
    prompt_format: str | None


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
    adapters: dict[str, ServedAdapter] = field(default_factory=dict)

    @property
    def wanted(self) -> Wanted:
        return Wanted(self.checkpoint_id, self.placement,
                      tuple((name, a.checkpoint_id) for name, a in sorted(self.adapters.items())))


@dataclass
class Served:
    name: str
    checkpoint_id: str  # what the table says it should serve
    is_default: bool
    adapters: dict[str, str] = field(default_factory=dict)  # what the table says: adapter name -> checkpoint id
    state: DeploymentState = DeploymentState.LOADING
    error: str | None = None
    current: Loaded | None = None  # what it serves now (the previous checkpoint while a new one loads)
    loading: Wanted | None = None
    attempted: Wanted | None = None  # what was last tried: a failure is not retried
    loading_bytes: int = 0  # memory_estimate of what is loading

    def memory_on(self, device) -> int:
        """What it holds on a device now: the checkpoint it serves and the one loading (both are in memory
        during a switch)."""
        held = self.current.memory_bytes if self.current and self.current.placement.device == device else 0
        return held + (self.loading_bytes if self.loading and self.loading.placement.device == device else 0)


@dataclass(frozen=True)
class Paths:
    """Where a deployment's files are, relative to the data dir: its checkpoint, the checkpoint an adapter-only
    one loads over, and each adapter's."""

    checkpoint: str
    base: str | None
    adapters: dict[str, str]


class NotServing(Exception):
    """A request for a deployment that cannot be answered now; the API gives each reason its status."""

    class Reason(StrEnum):
        MISSING = "missing"  # no deployment of that name
        NO_DEFAULT = "no_default"  # no name given, and no default deployment
        LOADING = "loading"  # its checkpoint is not loaded (yet, or it failed to load)
        WRONG_TASK = "wrong_task"  # it serves a classifier to a generation request, or the other way round
        AMBIGUOUS = "ambiguous"  # an adapter's bare name that several deployments serve

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
        base = aliased(Checkpoint)
        with self.database.session() as session:
            rows = session.execute(select(Deployment.id, Deployment.name, Deployment.checkpoint_id,
                                          Deployment.is_default, Deployment.device, Deployment.dtype, Checkpoint.path,
                                          Checkpoint.prompt_format, Checkpoint.model_config, Checkpoint.task,
                                          base.path.label("base_path"))
                                   .join(Checkpoint, Checkpoint.id == Deployment.checkpoint_id)
                                   .outerjoin(base, base.id == Checkpoint.adapter_of_id)
                                   .order_by(Deployment.id)).all()
            adapters: dict[str, list] = {}
            for adapter in session.execute(select(DeploymentAdapter.deployment_id, DeploymentAdapter.name,
                                                  DeploymentAdapter.checkpoint_id, Checkpoint.path,
                                                  Checkpoint.size_bytes)
                                           .join(Checkpoint, Checkpoint.id == DeploymentAdapter.checkpoint_id)
                                           .order_by(DeploymentAdapter.name)):
                adapters.setdefault(adapter.deployment_id, []).append(adapter)
        wanted = {row.name: row for row in rows}
        with self._lock:
            for name in set(self.served) - set(wanted):
                self._retire(self.served.pop(name).current)
            for name, row in wanted.items():
                served = self.served.get(name)
                if served is None:
                    served = self.served[name] = Served(name, row.checkpoint_id, row.is_default)
                served.is_default = row.is_default
                self._follow(served, row, adapters.get(row.id, []))
            self._stop_drained()

    def _follow(self, served: Served, row, adapters: list) -> None:
        """Start loading what the row asks this deployment to serve, unless it is served or loading already."""
        served.adapters = {a.name: a.checkpoint_id for a in adapters}
        try:
            placement = resolve(row.device, row.dtype)
        except PlacementError as e:  # a device this API process does not have
            served.checkpoint_id = row.checkpoint_id
            self._refuse(served, f"not loading checkpoint {row.checkpoint_id}: {e}")
            return
        wanted = Wanted(row.checkpoint_id, placement, tuple((a.name, a.checkpoint_id) for a in adapters))
        current = served.current
        if (current is not None and current.wanted == wanted) or served.loading == wanted or (
                served.state == DeploymentState.FAILED and served.attempted == wanted):
            return
        served.checkpoint_id, served.error, served.attempted = row.checkpoint_id, None, wanted
        try:
            estimate = memory_estimate(row.model_config, row.task, self.max_batch, placement,
                                       sum(a.size_bytes for a in adapters))
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
        paths = Paths(row.path, row.base_path, {a.name: a.path for a in adapters})
        threading.Thread(target=self._load, args=(served, wanted, paths, row.prompt_format, estimate),
                         name=f"load-{served.name}", daemon=True).start()

    @staticmethod
    def _refuse(served: Served, error: str) -> None:
        """The checkpoint is not loaded; what is served (if anything) stays served."""
        served.error = error
        if served.current is None:
            served.state = DeploymentState.FAILED

    def _loaded(self, wanted: Wanted, paths: "Paths", prompt_format: str | None, memory_bytes: int) -> Loaded:
        """The checkpoint (and its adapters) loaded on the placement: an engine for a language model."""
        checkpoint = self.storage.checkpoint_dir
        model, tokenizer, meta = load_checkpoint(checkpoint(paths.checkpoint),
                                                 base=paths.base and checkpoint(paths.base))
        merge_lora(model)  # in float32, on the CPU, before the model moves
        adapters = {name: load_adapter(checkpoint(path), meta) for name, path in paths.adapters.items()}
        model.to(device=wanted.placement.device, dtype=wanted.placement.dtype)
        engine = None
        if meta["task"] == CheckpointTask.LM:
            engine = Engine(model, tokenizer, self.max_batch, self.max_queue, adapters=adapters).start()
        else:
            pack_linears(model)  # classification runs batches of texts
        served_adapters = {name: ServedAdapter(checkpoint_id, adapters[name].meta.get("prompt_format"))
                           for name, checkpoint_id in wanted.adapters}
        return Loaded(wanted.checkpoint_id, wanted.placement, engine, model, tokenizer, meta, prompt_format,
                      memory_bytes, served_adapters)

    def _load(self, served: Served, wanted: Wanted, paths: "Paths", prompt_format: str | None,
              memory_bytes: int) -> None:
        what = f"checkpoint {wanted.checkpoint_id}" + (
            f" with adapters {', '.join(f'{n} ({c})' for n, c in wanted.adapters)}" if wanted.adapters else "")
        try:
            loaded = self._loaded(wanted, paths, prompt_format, memory_bytes)
        except Exception as e:  # any failure to load leaves the previous checkpoint served
            log.exception("deployment %s: loading %s failed", served.name, what)
            self.metrics.load_failures.labels(served.name).inc()
            with self._lock:
                if served.loading == wanted:
                    served.loading, served.loading_bytes = None, 0
                    served.error = f"loading {what} on {wanted.placement} failed: {e}"
                    served.state = DeploymentState.FAILED if served.current is None else DeploymentState.READY
            return
        with self._lock:
            if served.loading != wanted or self.served.get(served.name) is not served:
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

    def _named(self, model: str | None) -> tuple[Served, str | None]:
        """(deployment, adapter name or None) of a model name: a deployment's name (None: the default one),
        `<deployment>:<adapter>`, or an adapter's bare name that no deployment is called and only one serves."""
        if model is None:
            served = self.get(None)
            if served is None:
                raise NotServing(NotServing.Reason.NO_DEFAULT, "no default deployment")
            return served, None
        name, colon, adapter = model.partition(":")
        if colon:
            served = self.get(name)
            if served is None:
                raise NotServing(NotServing.Reason.MISSING, f"no deployment named {name!r}")
            if adapter not in served.adapters:
                held = ", ".join(served.adapters) or "none"
                raise NotServing(NotServing.Reason.MISSING,
                                 f"deployment {name} has no adapter named {adapter!r} (its adapters: {held})")
            return served, adapter
        served = self.get(model)
        if served is not None:
            return served, None
        holders = [s.name for s in self.all() if model in s.adapters]
        if not holders:
            raise NotServing(NotServing.Reason.MISSING, f"no deployment or adapter named {model!r}")
        if len(holders) > 1:
            raise NotServing(NotServing.Reason.AMBIGUOUS, f"deployments {', '.join(holders)} each serve an adapter "
                                                          f"named {model!r}: name one as "
                                                          f"{' or '.join(f'{h}:{model}' for h in holders)}")
        return self.get(holders[0]), model

    def serving(self, model: str | None, task: CheckpointTask) -> tuple[Served, str | None]:
        """The deployment (the default one without a name) and the adapter a model name asks for, loaded, and
        serving a model of this task."""
        served, adapter = self._named(model)
        current = served.current
        if current is None:
            raise NotServing(NotServing.Reason.LOADING, served.error or f"deployment {served.name} is still loading "
                                                                       f"checkpoint {served.checkpoint_id}")
        if current.meta["task"] != task or (adapter is not None and task != CheckpointTask.LM):
            other = "/classify" if task == CheckpointTask.LM else "/generate or /v1/completions"
            kind = "a classifier" if task == CheckpointTask.LM else "a language model"
            what = f"deployment {served.name} serves" if adapter is None else f"{served.name}:{adapter} is"
            raise NotServing(NotServing.Reason.WRONG_TASK, f"{what} {kind}: use {other}")
        if adapter is not None and adapter not in current.adapters:  # added to the deployment, loading
            raise NotServing(NotServing.Reason.LOADING, served.error or f"deployment {served.name} is still loading "
                                                                       f"adapter {adapter}")
        return served, adapter

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
