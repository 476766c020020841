import math

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from model.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from model.classifier import GPTClassifier, freeze_for_finetune
from model.lora import LoRAConfig, apply_lora
from model.objectives import ClassificationObjective, InstructionObjective, PretrainObjective
from model.tokenizer import gpt2_tokenizer
from model.trainer import Callback, TrainConfig, Trainer

CONFIG = GPTConfig(vocab_size=50257, context_length=32, n_layer=2, n_head=4, n_embd=32, dropout=0.1)


@pytest.fixture(scope="module")
def verdict_tokens(shared_data):
    return np.array(gpt2_tokenizer().encode((shared_data / "the-verdict.txt").read_text()), dtype=np.uint16)


def pretrain_task(tokens, stride=None):
    split = int(len(tokens) * 0.9)
    return PretrainObjective(tokens[:split], tokens[split:], block_size=16, batch_size=4, seed=3, stride=stride)


class Recorder(Callback):
    def __init__(self, stop_after: int | None = None):
        self.progress, self.metrics, self.checkpoints, self.samples = [], [], [], []
        self.stop_after = stop_after

    def on_progress(self, progress):
        self.progress.append(progress)

    def on_metrics(self, step, metrics):
        self.metrics.append((step, metrics))

    def on_sample(self, step, text):
        self.samples.append((step, text))

    def on_checkpoint(self, step, path, metrics):
        self.checkpoints.append((step, path))

    def should_stop(self):
        return self.stop_after is not None and len(self.progress) >= self.stop_after


def test_learning_rate_warms_up_then_decays_to_the_minimum():
    config = TrainConfig(max_steps=110, learning_rate=1e-3, warmup_steps=10, min_learning_rate=1e-4)
    assert config.lr_at(0) == pytest.approx(1e-4)
    assert config.lr_at(9) == pytest.approx(1e-3)
    assert config.lr_at(60) == pytest.approx(5.5e-4)
    assert config.lr_at(110) == pytest.approx(1e-4)
    assert TrainConfig(max_steps=10, learning_rate=1e-3).lr_at(10) == pytest.approx(1e-4)


def test_warmup_stable_decay_holds_the_peak_then_decays_linearly_over_the_last_steps():
    config = TrainConfig(max_steps=100, learning_rate=1e-3, warmup_steps=10, min_learning_rate=1e-4, schedule="wsd",
                         decay_fraction=0.2)
    assert config.lr_at(0) == pytest.approx(1e-4)
    assert config.lr_at(9) == config.lr_at(10) == config.lr_at(50) == config.lr_at(80) == pytest.approx(1e-3)
    assert config.lr_at(90) == pytest.approx(5.5e-4)
    assert config.lr_at(99) == pytest.approx(1e-4 + 9e-4 / 20)
    assert config.lr_at(100) == pytest.approx(1e-4)
    assert TrainConfig(max_steps=10, learning_rate=1e-3, schedule="wsd").lr_at(9) == pytest.approx(5.5e-4)


def test_a_constant_schedule_only_warms_up():
    config = TrainConfig(max_steps=10, learning_rate=1e-3, warmup_steps=2, schedule="constant")
    assert [config.lr_at(step) for step in (0, 1, 5, 9)] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


@pytest.mark.parametrize("bad", [dict(max_steps=0), dict(learning_rate=0), dict(grad_accum_steps=0),
                                 dict(min_learning_rate=1.0), dict(warmup_steps=-1), dict(grad_clip=0)])
def test_invalid_train_config(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


@pytest.mark.parametrize("bad", [dict(optimizer="sgd"), dict(muon_learning_rate=0), dict(schedule="linear"),
                                 dict(decay_fraction=0), dict(decay_fraction=1.5)])
def test_an_invalid_optimizer_or_schedule_is_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig(**bad)


def test_weight_decay_only_on_matrices(tmp_path, verdict_tokens):
    trainer = Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), TrainConfig(max_steps=1), gpt2_tokenizer(),
                      tmp_path)
    decayed, plain = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])


def test_a_checkpoint_the_callback_refuses_is_not_written(tmp_path, verdict_tokens):
    class Refusing(Recorder):
        def may_checkpoint(self):
            return False

    recorder = Refusing()
    result = Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), TrainConfig(max_steps=2, checkpoint_interval=1),
                     gpt2_tokenizer(), tmp_path / "out", recorder).train()
    assert result.status == "completed" and result.checkpoint is None
    assert recorder.checkpoints == [] and not (tmp_path / "out").exists()


def test_pretraining_reports_progress_metrics_samples_and_checkpoints(tmp_path, verdict_tokens):
    torch.manual_seed(0)
    recorder = Recorder()
    config = TrainConfig(max_steps=12, learning_rate=3e-3, eval_interval=4, eval_batches=2, sample_interval=6,
                         sample_tokens=5, checkpoint_interval=5)
    result = Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), config, gpt2_tokenizer(), tmp_path,
                     recorder).train()
    assert result.status == "completed" and result.step == 12 and len(result.train_losses) == 12
    assert [p.step for p in recorder.progress] == list(range(1, 13))
    last = recorder.progress[-1]
    assert last.tokens_seen == 12 * 4 * 16 and last.tokens_per_s > 0 and last.eta_s == 0
    val_steps = [step for step, m in recorder.metrics if "val_loss" in m]
    assert val_steps == [4, 8, 12]
    throughput = [(step, m) for step, m in recorder.metrics if "tokens_seen" in m]  # charted against tokens
    assert [(step, m["tokens_seen"]) for step, m in throughput] == [(s, s * 4 * 16) for s in range(1, 13)]
    assert all(m["tokens_per_s"] > 0 for _, m in throughput)
    val = [m for _, m in recorder.metrics if "val_loss" in m][-1]
    assert val["val_perplexity"] == pytest.approx(math.exp(val["val_loss"]))
    assert [step for step, _ in recorder.samples] == [6, 12]
    assert [step for step, _ in recorder.checkpoints] == [5, 10, 12]
    model, _, meta = load_checkpoint(result.checkpoint)
    assert meta["step"] == 12 and meta["metrics"]["val_loss"] == val["val_loss"]
    assert "tokens_per_s" not in meta["metrics"]  # a checkpoint's metrics measure the model, not the machine
    assert result.train_losses[-1] < result.train_losses[0]


@pytest.mark.parametrize("stride, options", [(None, {}), (8, {}),
                                             (None, dict(optimizer="muon", schedule="wsd", decay_fraction=0.5))])
def test_resumed_run_repeats_the_uninterrupted_loss_curve(tmp_path, verdict_tokens, stride, options):
    config = TrainConfig(max_steps=8, learning_rate=3e-3, warmup_steps=2, grad_accum_steps=2,
                         checkpoint_interval=4, eval_batches=1, **options)
    torch.manual_seed(0)
    initial = GPT(CONFIG).state_dict()

    def fresh_model():
        model = GPT(CONFIG)
        model.load_state_dict(initial)
        return model

    full = Trainer(fresh_model(), pretrain_task(verdict_tokens, stride), config, gpt2_tokenizer(),
                   tmp_path / "full", seed=5).train()
    interrupted = Trainer(fresh_model(), pretrain_task(verdict_tokens, stride), config, gpt2_tokenizer(),
                          tmp_path / "part", Recorder(stop_after=3), seed=5).train()
    assert interrupted.status == "stopped" and interrupted.step == 3
    model, _, _ = load_checkpoint(interrupted.checkpoint)
    resumed = Trainer(model.train(), pretrain_task(verdict_tokens, stride), config, gpt2_tokenizer(),
                      tmp_path / "part", seed=5)
    resumed.resume(interrupted.checkpoint)
    rest = resumed.train()
    assert interrupted.train_losses + rest.train_losses == full.train_losses
    final_full, _, _ = load_checkpoint(full.checkpoint)
    final_resumed, _, _ = load_checkpoint(rest.checkpoint)
    for name, tensor in final_full.state_dict().items():
        assert torch.equal(final_resumed.state_dict()[name], tensor), name


@pytest.mark.parametrize("change", [dict(grad_accum_steps=2), dict(optimizer="muon"), dict(schedule="wsd")])
def test_resume_refuses_a_different_setup(tmp_path, verdict_tokens, change):
    config = TrainConfig(max_steps=2, eval_batches=1)
    done = Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), config, gpt2_tokenizer(), tmp_path).train()
    other = Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), TrainConfig(max_steps=2, **change),
                    gpt2_tokenizer(), tmp_path)
    with pytest.raises(ValueError, match=f"cannot resume: {next(iter(change))}"):
        other.resume(done.checkpoint)


def test_a_checkpoint_from_before_optimizer_and_schedule_resumes_as_adamw_with_cosine(tmp_path, verdict_tokens):
    trainer = Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), TrainConfig(max_steps=2, eval_batches=1),
                      gpt2_tokenizer(), tmp_path)
    trainer.train()
    tensors, state = trainer.training_state()
    for name in ("optimizer", "muon_learning_rate", "schedule", "decay_fraction"):
        del state["config"][name]
    old = save_checkpoint(tmp_path / "old", trainer.model, gpt2_tokenizer(), step=2, training_state=(tensors, state))
    resumed = Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), TrainConfig(max_steps=2), gpt2_tokenizer(),
                      tmp_path)
    resumed.resume(old)
    assert resumed.step == 2
    with pytest.raises(ValueError, match="cannot resume: optimizer was 'adamw', now 'muon'"):
        Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), TrainConfig(max_steps=2, optimizer="muon"),
                gpt2_tokenizer(), tmp_path).resume(old)


def test_stop_request_keeps_a_final_checkpoint(tmp_path, verdict_tokens):
    result = Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), TrainConfig(max_steps=50), gpt2_tokenizer(),
                     tmp_path, Recorder(stop_after=2)).train()
    assert result.status == "stopped" and result.step == 2
    assert read_metadata(result.checkpoint)["step"] == 2


def synthetic_classification(n: int, seed: int):
    """Label 1 when token 7 occurs in the text: learnable in a few dozen steps."""
    rng = np.random.default_rng(seed)
    lengths = torch.from_numpy(rng.integers(3, 12, n))
    ids = torch.from_numpy(rng.integers(100, 400, (n, 12)))
    labels = torch.from_numpy(rng.integers(0, 2, n))
    for row in range(n):
        if labels[row]:
            ids[row, rng.integers(0, int(lengths[row]))] = 7
        ids[row, int(lengths[row]):] = 50256
    return ids, lengths, labels


def test_classifier_finetuning_learns_and_only_trains_the_chosen_layers(tmp_path):
    torch.manual_seed(0)
    model = GPTClassifier.from_lm(GPT(CONFIG), 2)
    freeze_for_finetune(model, trainable_blocks=2)
    frozen_before = model.gpt.wte.weight.detach().clone()
    train, val = synthetic_classification(256, 1), synthetic_classification(64, 2)
    task = ClassificationObjective(train, val, batch_size=16)
    config = TrainConfig(max_steps=100, learning_rate=1e-2, eval_interval=100, eval_batches=4)
    result = Trainer(model, task, config, gpt2_tokenizer(), tmp_path, label_names=["no", "yes"]).train()
    assert result.metrics["val_accuracy"] >= 0.9
    assert torch.equal(model.gpt.wte.weight, frozen_before)
    _, _, meta = load_checkpoint(result.checkpoint)
    assert meta["task"] == "classifier" and meta["label_names"] == ["no", "yes"]


def test_lora_finetuning_changes_only_the_adapters(tmp_path, verdict_tokens):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, lora)
    result = Trainer(model, pretrain_task(verdict_tokens), TrainConfig(max_steps=4, learning_rate=1e-2),
                     gpt2_tokenizer(), tmp_path, lora=lora).train()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if "lora_b" in k)
    loaded, _, meta = load_checkpoint(result.checkpoint)
    assert meta["lora"]["rank"] == 4


def test_instruction_finetuning_lowers_the_validation_loss(tmp_path):
    tokenizer = gpt2_tokenizer()
    records = [(tokenizer.encode(f"### Instruction:\nRepeat {w}\n\n### Response:\n{w} {w}"), 8)
               for w in ("cat", "dog", "sun", "sea", "red", "blue", "tree", "rock")]
    torch.manual_seed(0)
    task = InstructionObjective(records[:6], records[6:], batch_size=3)
    config = TrainConfig(max_steps=30, learning_rate=5e-3, eval_interval=15, eval_batches=1)
    recorder = Recorder()
    Trainer(GPT(CONFIG), task, config, tokenizer, tmp_path, recorder).train()
    val = [m["val_loss"] for _, m in recorder.metrics if "val_loss" in m]
    assert len(val) == 2 and val[1] < val[0]


def test_pretrain_task_rejects_too_little_data():
    with pytest.raises(ValueError, match="validation split has 5 tokens"):
        PretrainObjective(np.arange(100), np.arange(5), block_size=16, batch_size=2)


def test_patience_stops_once_the_validation_loss_stops_improving(tmp_path, verdict_tokens):
    # a learning rate that overshoots, evaluated every step: the validation loss soon stops falling
    config = TrainConfig(max_steps=40, learning_rate=0.05, eval_interval=1, eval_batches=1, checkpoint_interval=0,
                         patience=2)
    torch.manual_seed(0)
    recorder = Recorder()
    result = Trainer(GPT(CONFIG), pretrain_task(verdict_tokens), config, gpt2_tokenizer(), tmp_path, recorder,
                     seed=1).train()
    val = [metrics["val_loss"] for _, metrics in recorder.metrics if "val_loss" in metrics]
    best, since, expected = math.inf, 0, None
    for step, loss in enumerate(val, start=1):
        best, since = (loss, 0) if loss < best else (best, since + 1)
        if since == 2:
            expected = step
            break
    assert expected is not None and expected < 40, val
    assert result.status == "completed" and result.stopped_early and result.step == expected
    assert [step for step, _ in recorder.checkpoints] == [expected]  # the run's end is checkpointed
    with pytest.raises(ValueError, match="patience"):
        TrainConfig(patience=0)
