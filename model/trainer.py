"""One Trainer for pretraining and both finetunes.

AdamW (weight decay on matrices only, fused where available), or Muon (model.muon) for the transformer
blocks' matrices with AdamW for the rest; linear warmup then cosine decay to a minimum (or warmup-stable-decay,
or constant), gradient clipping and accumulation, bf16 autocast on CUDA (fp32 on CPU), optional torch.compile,
periodic evaluation, samples and checkpoints, callbacks, and an exact resume. Run in every process of a
torch.distributed process group, it trains data-parallel (model.parallel): only rank 0 reports to its
callback, samples and writes checkpoints, and rank 0's callback decides for all when to stop.

What it trains on is an objective (model.objectives): batch i is a pure function of the objective's seed and
i, so the data position after a resume is just the step, and a resumed run repeats the uninterrupted loss
curve.
"""

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from model.checkpoint import load_training_state, save_checkpoint
from model.generate import generate
from model.gpt import Block
from model.lora import LoRAConfig
from model.muon import CombinedOptimizer, Muon
from model.parallel import agree, gather, micro_batches, rank_and_world, sum_across

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class TrainConfig:
    """How to train; the service's job requests expose these fields with these defaults."""

    max_steps: int = 200
    learning_rate: float = 6e-4  # AdamW's: of every parameter, or with Muon of those Muon does not train
    min_learning_rate: float | None = None  # end of the decay; learning_rate / 10 when None
    warmup_steps: int = 0
    schedule: str = "cosine"  # after the warmup: "cosine", "wsd" (warmup-stable-decay) or "constant"
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps, decayed linearly to min_learning_rate
    optimizer: str = "adamw"  # "adamw", or "muon": Muon for the blocks' matrices and AdamW for the rest
    muon_learning_rate: float = 0.02  # Muon's peak; the schedule scales it as it scales learning_rate
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    grad_accum_steps: int = 1
    eval_interval: int = 50  # 0: evaluate only at the end (always evaluated at the end)
    eval_batches: int = 10
    patience: int | None = None  # stop once this many evaluations in a row found no lower val_loss; None: never
    sample_interval: int = 0  # 0: never sample
    sample_prompt: str = "\n"
    sample_tokens: int = 40
    checkpoint_interval: int = 100  # 0: checkpoint only at the end (always checkpointed at the end)
    compile: bool = False
    device: str = "auto"

    @classmethod
    def from_values(cls, values: dict, **overrides) -> "TrainConfig":
        """The config of the fields of values that are TrainConfig's (a job's hyperparameters hold others)."""
        names = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in names}, **overrides)

    def __post_init__(self):
        positive = ("max_steps", "grad_accum_steps", "eval_batches", "sample_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None, got {self.patience!r}")
        for name in ("warmup_steps", "eval_interval", "sample_interval", "checkpoint_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("learning_rate", "muon_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.min_learning_rate is not None and not self.min_learning_rate >= 0:
            raise ValueError(f"min_learning_rate must be >= 0, got {self.min_learning_rate!r}")
        if self.min_learning_rate is not None and self.min_learning_rate > self.learning_rate:
            raise ValueError("min_learning_rate must not exceed learning_rate")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warmup, then the schedule: cosine to the
        minimum; wsd: constant, then linear to the minimum over the last decay_fraction of the steps; constant."""
        floor = self.learning_rate / 10 if self.min_learning_rate is None else self.min_learning_rate
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.learning_rate
        if self.schedule == "wsd":
            left = min(1.0, max(0, self.max_steps - step) / (self.decay_fraction * self.max_steps))
            return floor + left * (self.learning_rate - floor)
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (self.learning_rate - floor)


class Objective(Protocol):
    kind: str  # "lm" or "classifier": what the model predicts

    def batch(self, index: int) -> tuple[Tensor, ...]: ...  # a pure function of index

    def loss(self, model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor: ...

    def n_tokens(self, batch: tuple[Tensor, ...]) -> int: ...

    def evaluate(self, model: nn.Module, max_batches: int, autocast) -> dict[str, float]: ...


@dataclass
class TrainProgress:
    step: int
    total_steps: int
    tokens_seen: int
    tokens_per_s: float
    eta_s: float
    train_loss: float
    learning_rate: float
    val_loss: float | None = None


class Callback:
    """Receives what the Trainer does; override what you need. should_stop asks for a clean stop."""

    def on_progress(self, progress: TrainProgress) -> None: ...

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def on_sample(self, step: int, text: str) -> None: ...

    def may_checkpoint(self) -> bool:
        """Asked before each checkpoint is written: False skips it (the run is no longer the caller's to save)."""
        return True

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, float]) -> None: ...

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainResult:
    status: str  # "completed" or "stopped"
    step: int
    stopped_early: bool = False  # completed before max_steps: the validation loss stopped improving (patience)
    train_losses: list[float] = field(default_factory=list)  # this run's losses, one per step
    metrics: dict[str, float] = field(default_factory=dict)  # the latest of every metric
    checkpoint: Path | None = None  # the last checkpoint written


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, fp32 on the CPU: how the trainer runs its forwards, and anything that must give the
    same numbers (DPO's reference log-probabilities)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def hidden_matrices(model: nn.Module) -> list[Tensor]:
    """The weights of the linear layers inside the transformer blocks, which Muon trains.

    Not a LoRA adapter's A [rank, in] and B [out, rank]: a handful of directions each, where orthogonalizing has
    little to even out, and B starts at zero, so Muon's full-size first steps would jolt the frozen model that
    LoRA's small Adam steps leave intact; AdamW trains them, as LoRA's usual learning rates assume.
    """
    return [module.weight for block in model.modules() if isinstance(block, Block)
            for module in block.modules() if isinstance(module, nn.Linear)]


def make_optimizer(model: nn.Module, config: TrainConfig,
                   device: torch.device) -> torch.optim.AdamW | CombinedOptimizer:
    """AdamW with weight decay on matrices and embeddings only, never on biases and LayerNorms; with optimizer
    "muon", Muon for the trainable hidden matrices and that AdamW for the rest. Frozen parameters are in neither."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    hidden = {id(p) for p in hidden_matrices(model)} if config.optimizer == "muon" else set()
    muon = [p for p in params if id(p) in hidden]
    rest = [p for p in params if id(p) not in hidden]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    fused = device.type in ("cuda", "cpu")
    adamw = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)
    return CombinedOptimizer(Muon(muon, lr=config.muon_learning_rate), adamw) if muon else adamw


class Trainer:
    def __init__(self, model: nn.Module, objective: Objective, config: TrainConfig, tokenizer, out_dir,
                 callback: Callback | None = None, seed: int = 1337, label_names: list[str] | None = None,
                 parent: str | None = None, lora: LoRAConfig | None = None, prompt_format: str | None = None,
                 adapter_of: dict | None = None):
        self.config = config
        self.rank, self.world = rank_and_world()
        micro_batches(0, config.grad_accum_steps, self.rank, self.world)  # the ranks share the micro-batches
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.objective = objective
        self.tokenizer = tokenizer
        self.out_dir = Path(out_dir)
        self.callback = (callback or Callback()) if self.rank == 0 else Callback()  # rank 0 speaks for all
        self.seed = seed
        # adapter_of (see save_checkpoint): every checkpoint holds the adapters alone
        self.checkpoint_meta = dict(label_names=label_names, parent=parent, lora=lora, prompt_format=prompt_format,
                                    adapter_of=adapter_of)
        self.optimizer = make_optimizer(self.model, config, self.device)
        self.peak_lrs = [group["lr"] for group in self.optimizer.param_groups]  # the schedule scales each
        self.step = 0
        self.tokens_seen = 0
        self.metrics: dict[str, float] = {}
        self._last_checkpoint_step = -1
        self.best_val_loss: float | None = None
        self.evaluations_since_best = 0
        # DDP starts every rank from rank 0's weights and averages the gradients
        self.parallel = None if self.world == 1 else DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        wrapped = self.parallel or self.model
        self.forward_model = torch.compile(wrapped) if config.compile else wrapped
        torch.manual_seed(seed + self.rank)  # dropout differs between ranks; rank 0 draws as one process does

    def autocast(self):
        return autocast_for(self.device)

    # -- exact resume -------------------------------------------------------------------------------
    def training_state(self) -> tuple[dict[str, Tensor], dict]:
        state = self.optimizer.state_dict()
        tensors = {f"optimizer.{index}.{key}": value for index, slots in state["state"].items()
                   for key, value in slots.items()}
        for name, rng in self._rng_states().items():
            tensors[name] = rng
        return tensors, {"step": self.step, "tokens_seen": self.tokens_seen, "seed": self.seed,
                         "metrics": self.metrics, "param_groups": state["param_groups"],
                         "best_val_loss": self.best_val_loss, "evaluations_since_best": self.evaluations_since_best,
                         "config": asdict(self.config)}

    def resume(self, checkpoint: str | Path) -> None:
        """Continue from a checkpoint this trainer's setup wrote; the model must hold its weights (an adapter-only
        checkpoint's, as load_checkpoint(checkpoint, base=...) gives them)."""
        tensors, state = load_training_state(checkpoint)
        saved = asdict(TrainConfig()) | state["config"]  # a run from before a field existed had its default
        for name in ("grad_accum_steps", "max_steps", "learning_rate", "warmup_steps", "schedule", "decay_fraction",
                     "optimizer", "muon_learning_rate"):
            if saved[name] != getattr(self.config, name):
                raise ValueError(f"cannot resume: {name} was {saved[name]!r}, now "
                                 f"{getattr(self.config, name)!r}")
        if state["seed"] != self.seed:
            raise ValueError(f"cannot resume: the run's seed was {state['seed']}, now {self.seed}")
        optimizer_state: dict = {"state": {}, "param_groups": state["param_groups"]}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[key] = value
        for group in optimizer_state["param_groups"]:
            if "betas" in group:  # AdamW's (JSON made the tuple a list); Muon has none
                group["betas"] = tuple(group["betas"])
        self.optimizer.load_state_dict(optimizer_state)
        suffix = f".rank{self.rank}" if self.rank else ""  # a rank the saving run lacked draws from rank 0's state
        torch.set_rng_state(tensors.get(f"rng.cpu{suffix}", tensors["rng.cpu"]))
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors.get(f"rng.cuda{suffix}", tensors["rng.cuda"]), self.device)
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.best_val_loss = state.get("best_val_loss")
        self.evaluations_since_best = state.get("evaluations_since_best", 0)
        self.metrics = dict(state["metrics"])

    def _rng_states(self) -> dict[str, Tensor]:
        """Every rank's random state (a collective), rank 0's under the names a single process uses."""
        own = {"rng.cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            own["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if self.world == 1:
            return own
        states = {}
        for rank, theirs in enumerate(gather(own)):
            states |= {name + (f".rank{rank}" if rank else ""): state for name, state in theirs.items()}
        return states

    # -- the loop -----------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        config = self.config
        result = TrainResult("completed", self.step)
        step_times: list[float] = []
        while self.step < config.max_steps:
            if self._should_stop():
                result.status = "stopped"
                break
            started = time.perf_counter()
            lr = config.lr_at(self.step)
            loss, tokens = self._optimizer_step(lr)
            step_times = (step_times + [time.perf_counter() - started])[-20:]
            self.step += 1
            self.tokens_seen += tokens
            result.train_losses.append(loss)
            seconds_per_step = sum(step_times) / len(step_times)
            self._record({"train_loss": loss, "learning_rate": lr})
            # throughput is charted with the curves but is no checkpoint's metric
            self.callback.on_metrics(self.step, {"tokens_seen": self.tokens_seen,
                                                 "tokens_per_s": tokens / seconds_per_step})
            finished = self.step == config.max_steps
            if finished or self._due(config.eval_interval):
                self._evaluate()
                if self._out_of_patience() and not finished:
                    finished = result.stopped_early = True
            if self._due(config.sample_interval) and self.objective.kind == "lm" and self.rank == 0:
                self.callback.on_sample(self.step, self.sample())
            if finished or self._due(config.checkpoint_interval):
                result.checkpoint = self._checkpoint() or result.checkpoint
            self.callback.on_progress(TrainProgress(
                self.step, config.max_steps, self.tokens_seen, tokens / seconds_per_step,
                seconds_per_step * (config.max_steps - self.step), loss, lr, self.metrics.get("val_loss")))
            if result.stopped_early:
                break
        if result.status == "stopped" and self.step > 0 and self._last_checkpoint_step != self.step:
            result.checkpoint = self._checkpoint() or result.checkpoint
        result.step = self.step
        result.metrics = dict(self.metrics)
        return result

    def _out_of_patience(self) -> bool:
        """Count the evaluations since the lowest validation loss; whether patience has run out."""
        val_loss = self.metrics.get("val_loss")
        if val_loss is None:  # an objective without a validation loss never runs out
            return False
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss, self.evaluations_since_best = val_loss, 0
        else:
            self.evaluations_since_best += 1
        out = self.config.patience is not None and self.evaluations_since_best >= self.config.patience
        return agree(out, self.device) if self.world > 1 else out

    def _due(self, interval: int) -> bool:
        return interval > 0 and self.step % interval == 0

    def _should_stop(self) -> bool:
        stop = self.callback.should_stop() if self.rank == 0 else False
        return agree(stop, self.device) if self.world > 1 else stop

    def _optimizer_step(self, lr: float) -> tuple[float, int]:
        config = self.config
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs, strict=True):
            group["lr"] = lr * (peak / config.learning_rate)  # AdamW's peak is learning_rate: a factor of exactly 1
        self.model.train()
        total_loss, tokens = 0.0, 0
        indices = micro_batches(self.step, config.grad_accum_steps, self.rank, self.world)
        for index in indices:
            batch = tuple(t.to(self.device) for t in self.objective.batch(index))
            last = index == indices[-1]
            # gradients are averaged across ranks once, at the step's last micro-batch
            with contextlib.nullcontext() if self.parallel is None or last else self.parallel.no_sync():
                with self.autocast():
                    loss = self.objective.loss(self.forward_model, batch) / len(indices)
                loss.backward()
            total_loss += loss.item()
            tokens += self.objective.n_tokens(batch)
        if self.world > 1:
            summed_loss, summed_tokens = sum_across([total_loss, tokens], self.device)
            total_loss, tokens = summed_loss / self.world, int(summed_tokens)
        if config.grad_clip is not None:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss, tokens

    def _record(self, metrics: dict[str, float]) -> None:
        self.metrics.update(metrics)
        self.callback.on_metrics(self.step, metrics)

    def _evaluate(self) -> None:
        self.model.eval()
        with torch.no_grad():
            metrics = self.objective.evaluate(self.model, self.config.eval_batches, self.autocast)
        self.model.train()
        self._record(metrics)

    def sample(self) -> str:
        prompt = self.tokenizer.encode(self.config.sample_prompt) or [self.tokenizer.eot_id]
        idx = torch.tensor([prompt], device=self.device)
        self.model.eval()
        out = generate(self.model, idx, self.config.sample_tokens)
        self.model.train()
        return self.tokenizer.decode(out[0, len(prompt):].tolist())

    def _checkpoint(self) -> Path | None:
        self._last_checkpoint_step = self.step
        state = self.training_state()  # on every rank: it gathers their random states
        if self.rank != 0 or not self.callback.may_checkpoint():
            return None
        path = self.out_dir / f"step-{self.step:07d}"
        save_checkpoint(path, self.model, self.tokenizer, step=self.step, metrics=dict(self.metrics),
                        training_state=state, **self.checkpoint_meta)
        self.callback.on_checkpoint(self.step, path, dict(self.metrics))
        return path
