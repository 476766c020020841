"""Direct Preference Optimization (Rafailov et al. 2023), as in the book's chapter-7 bonus notebook.

DPO trains a language model (the policy) on prompts with a chosen and a rejected response, against a
frozen reference: the model DPO starts from. A response's implicit reward is beta * (log pi(y|x) -
log ref(y|x)); the loss is -log sigmoid of the chosen response's reward less the rejected one's (the
reward margin), so the policy learns to rank chosen above rejected without drifting far from the reference.

The reference never changes, so its log-probabilities are computed once, for every training and
validation pair, before training (pair_logprobs of the base model) and travel in the batches: no second
model is held while training. With LoRA, the reference is the base model before apply_lora (adapters
off); a fresh adapter changes nothing, so the adapted model before its first step gives the same numbers.
A resumed run computes it again from the base, never from its own latest weights. Train without dropout,
as the book does: the reference is computed without it, and with it the policy's margins are noise
before they are learned.

A response's log-probability is the sum over its tokens, end-of-text included, as in the paper; the
book's notebook averages over the tokens instead.

DPO moves a model that already follows instructions a little: its learning rate is an instruction finetune's
divided by ten or more (LEARNING_RATE, a job's default; the paper's 5e-7 is for models a thousand times larger).
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.attention import CausalSelfAttention
from model.evaluation import ProgressCallback, report_progress
from model.gpt import GPT
from model.objectives import epoch_batches, epoch_rows
from model.preference_data import PreferencePair, response_batch

LEARNING_RATE = 1e-4


def without_dropout(model: nn.Module) -> nn.Module:
    """model with every dropout switched off, its config unchanged: DPO trains without it (see above)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, CausalSelfAttention):
            module.dropout = 0.0
    return model


def sequence_logprobs(model: nn.Module, inputs: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Sum of the log-probabilities of each row's targets [N] that are not ignore_index, from one forward
    of inputs [N, T] (response_batch's tensors: a response given its prompt, the padding ignored).

    A GPT makes logits only where a response token is predicted: the LM head is most of a small model's
    work, and a response is a fraction of its sequence. A wrapped model (DistributedDataParallel,
    torch.compile) must be called through its forward, which makes them everywhere."""
    scored = targets != ignore_index  # [N, T]
    if isinstance(model, GPT):
        logits = F.linear(model.hidden_states(inputs)[scored], model.output_weight)  # [S, V]
    else:
        logits = model(inputs)[0][scored]  # [S, V]
    # fp32: a sum of many tokens' log-probabilities keeps its precision under autocast
    picked = -F.cross_entropy(logits.float(), targets[scored], reduction="none")  # [S]
    logprobs = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device)  # [N, T]
    logprobs[scored] = picked
    return logprobs.sum(-1)


def pair_batch(pairs: list[PreferencePair], pad_id: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets [2B, T] of B pairs: the chosen sequences, then the rejected ones, so that both
    responses of every pair are scored in one forward."""
    return response_batch([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs], pad_id)


def _by_pair(logprobs: Tensor) -> Tensor:
    return logprobs.view(2, -1).T  # [2B] (chosen rows, then rejected) -> [B, 2] (chosen, rejected)


def reward_margins(policy: Tensor, reference: Tensor, beta: float) -> Tensor:
    """beta * ((pi_c - ref_c) - (pi_r - ref_r)) [B] of log-probabilities [B, 2] (chosen, rejected)."""
    rewards = beta * (policy - reference)  # [B, 2]: the implicit rewards of chosen and rejected
    return rewards[:, 0] - rewards[:, 1]


def dpo_loss(margins: Tensor) -> Tensor:
    return -F.logsigmoid(margins).mean()


@torch.no_grad()
def pair_logprobs(model: nn.Module, pairs: list[PreferencePair], pad_id: int, batch_size: int = 8,
                  autocast=contextlib.nullcontext, progress: ProgressCallback = None) -> Tensor:
    """Log-probabilities [N, 2] (chosen, rejected) of each pair's responses given its prompt, in eval mode
    (no dropout), on the CPU.

    DPO's reference is this of the frozen base model, for the training and the validation pairs, before
    training starts. Use the autocast and batch_size training evaluates with: a row's numbers can change in
    the last bits with the padding of its batch, and only equal numbers make a policy's margins at its
    start exactly 0."""
    if not pairs:
        raise ValueError("no pairs to score")
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(pairs), batch_size):
        inputs, targets = (t.to(device) for t in pair_batch(pairs[i: i + batch_size], pad_id))
        with autocast():
            out.append(_by_pair(sequence_logprobs(model, inputs, targets)).cpu())
        report_progress(progress, min(i + batch_size, len(pairs)), len(pairs))
    return torch.cat(out)


@dataclass(frozen=True)
class PreferenceScores:
    logprobs: Tensor  # [N, 2] the model's log-probabilities of chosen and rejected
    margins: Tensor  # [N] reward margins: beta * ((pi_c - ref_c) - (pi_r - ref_r))

    @property
    def accuracy(self) -> float:
        """The fraction of pairs whose chosen response wins: margin > 0, a tie is no win."""
        return float((self.margins > 0).float().mean())

    @property
    def mean_margin(self) -> float:
        return float(self.margins.mean())


def preference_scores(model: nn.Module, pairs: list[PreferencePair], reference: Tensor | None, beta: float = 0.1,
                      pad_id: int = 50256, batch_size: int = 8, autocast=contextlib.nullcontext,
                      progress: ProgressCallback = None) -> PreferenceScores:
    """How well the model ranks each pair's chosen response above its rejected one.

    With reference (pair_logprobs [N, 2] of the checkpoint a DPO model was trained from, its parent), the
    margins are DPO's implicit reward margins: what DPO training reports as val_reward_margin and
    val_preference_accuracy, and 0 for the parent itself. With reference=None, the margin is
    beta * (pi_c - pi_r): whether the model itself finds the chosen response more likely, which needs no
    second model and compares any checkpoints, a parent and its DPO child included. The service should
    score every checkpoint with reference=None, and a DPO checkpoint with its parent's reference too; sums
    of log-probabilities favour short responses, which the reference cancels out."""
    logprobs = pair_logprobs(model, pairs, pad_id, batch_size, autocast, progress)
    baseline = torch.zeros_like(logprobs) if reference is None else reference
    if baseline.shape != logprobs.shape:
        raise ValueError(f"reference has shape {tuple(baseline.shape)}, the pairs need {tuple(logprobs.shape)}")
    return PreferenceScores(logprobs, reward_margins(logprobs, baseline, beta))


class DPOObjective:
    """Preference pairs with their reference log-probabilities (pair_logprobs of the base model) for DPO.

    The model stays a language model ("lm"); a batch is (inputs, targets) of pair_batch and the reference
    [B, 2] of its pairs."""

    kind = "lm"

    def __init__(self, train: list[PreferencePair], val: list[PreferencePair], train_reference: Tensor,
                 val_reference: Tensor, batch_size: int, seed: int = 1337, pad_id: int = 50256, beta: float = 0.1):
        for name, pairs, reference in (("training", train, train_reference), ("validation", val, val_reference)):
            if not pairs:
                raise ValueError(f"DPO needs at least one {name} pair")
            if tuple(reference.shape) != (len(pairs), 2):
                raise ValueError(f"the {name} reference has shape {tuple(reference.shape)}, its {len(pairs)} "
                                 f"pairs need ({len(pairs)}, 2)")
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta!r}")
        self.train, self.val, self.train_reference, self.val_reference = train, val, train_reference, val_reference
        self.batch_size, self.seed, self.pad_id, self.beta = batch_size, seed, pad_id, beta

    @property
    def batches_per_epoch(self) -> int:
        return epoch_batches(len(self.train), self.batch_size)

    def batch(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        rows = epoch_rows(len(self.train), self.batch_size, self.seed, index)
        inputs, targets = pair_batch([self.train[i] for i in rows], self.pad_id)
        return inputs, targets, self.train_reference[torch.from_numpy(rows)]

    def loss(self, model: nn.Module, batch) -> Tensor:
        inputs, targets, reference = batch
        return dpo_loss(reward_margins(_by_pair(sequence_logprobs(model, inputs, targets)), reference, self.beta))

    def n_tokens(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def evaluate(self, model: nn.Module, max_batches: int, autocast) -> dict[str, float]:
        """DPO's loss, mean reward margin and preference accuracy on the first validation pairs: the same
        pairs every time."""
        n = min(len(self.val), max_batches * self.batch_size)
        scores = preference_scores(model, self.val[:n], self.val_reference[:n], self.beta, self.pad_id,
                                   self.batch_size, autocast)
        return {"val_loss": float(dpo_loss(scores.margins)), "val_reward_margin": scores.mean_margin,
                "val_preference_accuracy": scores.accuracy}
