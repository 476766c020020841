"""Scoring a checkpoint: language-model loss and bits per byte, classification metrics, instruction answers.

Every function takes an optional `progress(done, total)` callback that returns True to stop early (a
cancelled evaluation), in which case it raises EvaluationStopped.
"""

import math
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model.classifier import GPTClassifier
from model.generate import generate_batch
from model.gpt import GPT
from model.instruction_data import NEXT_SECTION, format_prompt, format_response, instruction_collate
from model.loss import perplexity
from model.tokenizer import Tokenizer

ProgressCallback = Callable[[int, int], bool] | None


# the metrics that rank checkpoints, and which way is better; the others (tokens, bytes, counts) describe
HIGHER_IS_BETTER = ("accuracy", "macro_f1", "exact_match", "token_f1", "judge_score", "preference_accuracy",
                    "mean_margin")
LOWER_IS_BETTER = ("loss", "perplexity", "bits_per_byte", "response_loss", "response_perplexity")
LOGIT_ROWS = 512  # logits are made this many positions at a time: [512, 50257] fp32 is 100 MB


class EvaluationStopped(Exception):
    """The progress callback asked to stop."""


def report_progress(progress: ProgressCallback, done: int, total: int) -> None:
    if progress is not None and progress(done, total):
        raise EvaluationStopped(f"stopped after {done} of {total}")


def _summed_loss(model: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> float:
    """Cross-entropy of hidden states [N, C] against targets [N], summed; memory bounded by LOGIT_ROWS."""
    total = 0.0
    for rows, wanted in zip(hidden.split(LOGIT_ROWS), targets.split(LOGIT_ROWS), strict=True):
        logits = F.linear(rows, model.output_weight).float()  # [LOGIT_ROWS, V]
        total += F.cross_entropy(logits, wanted, reduction="sum").item()
    return total


# -- language models ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LMScore:
    loss_sum: float  # nats, summed over every scored token
    n_tokens: int
    n_bytes: int  # UTF-8 bytes of the scored tokens: the whole text
    vocab_size: int

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.n_tokens

    @property
    def perplexity(self) -> float:
        return perplexity(self.mean_loss)

    @property
    def bits_per_byte(self) -> float:
        return self.loss_sum / (math.log(2) * self.n_bytes)

    @property
    def uniform_bits_per_byte(self) -> float:
        """What a model that gives every token of its vocabulary the same probability scores."""
        return self.n_tokens * math.log2(self.vocab_size) / self.n_bytes

    def metrics(self) -> dict[str, float]:
        return {"loss": self.mean_loss, "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte,
                "uniform_bits_per_byte": self.uniform_bits_per_byte, "tokens": self.n_tokens,
                "bytes": self.n_bytes}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 length of every token id's bytes [vocab_size] (special tokens count as their text)."""
    return np.array([len(token) for token in tokenizer.token_bytes(range(tokenizer.vocab_size))], dtype=np.int64)


def scoring_windows(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of the sliding windows that score targets 1..n_tokens-1 exactly once.

    A window at `start` reads inputs start..start+block_size-1 and predicts the next token at each; it
    scores only the targets that no earlier window scored, so every target after the first window has at
    least block_size - stride tokens of context. The last window is moved back to end at the last token.
    """
    if not 0 < stride <= block_size:
        raise ValueError(f"stride must be between 1 and block_size ({block_size}), got {stride}")
    n_targets = n_tokens - 1
    if n_targets < 1:
        raise ValueError("scoring needs at least one token after the first")
    length = min(block_size, n_targets)
    windows, scored = [], 0  # targets 1..scored are done
    start = 0
    while scored < n_targets:
        start = min(start, n_targets - length)
        windows.append((start, scored - start))
        scored = start + length
        start += stride
    return windows


@torch.no_grad()
def score_tokens(model: GPT, tokens: np.ndarray, byte_lengths: np.ndarray, block_size: int, stride: int,
                 batch_size: int = 8, bos_id: int | None = None, progress: ProgressCallback = None) -> LMScore:
    """Cross-entropy of every token of `tokens` given the ones before it, in sliding windows.

    With bos_id the first token is scored too, given bos_id (GPT-2's <|endoftext|>), so the score covers
    every byte of the text and bits per byte compare across tokenizers.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if bos_id is not None:
        tokens = np.concatenate([[bos_id], tokens])
    if block_size > model.config.context_length:
        raise ValueError(f"block_size {block_size} exceeds the model's context length "
                         f"{model.config.context_length}")
    windows = scoring_windows(len(tokens), block_size, stride)
    length = min(block_size, len(tokens) - 1)
    device = model.output_weight.device
    model.eval()
    loss_sum = 0.0
    for i in range(0, len(windows), batch_size):
        batch = windows[i: i + batch_size]
        rows = np.stack([tokens[start: start + length + 1] for start, _ in batch])
        x = torch.from_numpy(rows[:, :-1]).to(device)
        y = torch.from_numpy(rows[:, 1:]).to(device)
        scored = torch.arange(length, device=device)[None, :] >= torch.tensor([s for _, s in batch],
                                                                              device=device)[:, None]
        loss_sum += _summed_loss(model, model.hidden_states(x)[scored], y[scored])  # logits only where they count
        report_progress(progress, min(i + batch_size, len(windows)), len(windows))
    scored_tokens = tokens[1:]
    return LMScore(loss_sum, len(scored_tokens), int(byte_lengths[scored_tokens].sum()), model.config.vocab_size)


# -- classifiers -------------------------------------------------------------------------------------

@torch.no_grad()
def classify(model: GPTClassifier, ids: torch.Tensor, lengths: torch.Tensor, batch_size: int = 64,
             progress: ProgressCallback = None) -> torch.Tensor:
    """Probabilities [N, n_classes] of right-padded texts ids [N, T] with lengths [N] real tokens."""
    model.eval()
    device = model.head.weight.device
    out = []
    for i in range(0, len(ids), batch_size):
        rows = slice(i, i + batch_size)
        batch_lengths = lengths[rows]
        batch = ids[rows, : int(batch_lengths.max())]  # padding past the longest text is wasted work
        out.append(model(batch.to(device), batch_lengths.to(device))[0].float().softmax(-1).cpu())
        report_progress(progress, min(i + batch_size, len(ids)), len(ids))
    return torch.cat(out)


def _ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else 0.0


def classification_report(labels: list[int], probabilities: torch.Tensor, label_names: list[str]) -> dict:
    """Accuracy, mean loss, per-class precision / recall / F1 / support, macro F1 and the confusion
    matrix (rows: true label, columns: predicted). A class never predicted has precision 0."""
    n_classes = len(label_names)
    true = torch.tensor(labels)
    predicted = probabilities.argmax(-1)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((true, predicted), torch.ones_like(true), accumulate=True)
    per_class = {}
    for k, name in enumerate(label_names):
        hits = int(confusion[k, k])
        precision = _ratio(hits, int(confusion[:, k].sum()))
        recall = _ratio(hits, int(confusion[k].sum()))
        f1 = _ratio(2 * precision * recall, precision + recall)
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(confusion[k].sum())}
    true_probability = probabilities[torch.arange(len(labels)), true].clamp_min(1e-12)
    correct = int(confusion.diagonal().sum())
    return {
        "accuracy": correct / len(labels),
        "correct": correct,
        "examples": len(labels),
        "loss": float(-true_probability.log().mean()),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / n_classes,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
    }


# -- instruction-finetuned models --------------------------------------------------------------------

@torch.no_grad()
def response_loss(model: GPT, encoded: list[tuple[list[int], int]], pad_id: int, batch_size: int = 8,
                  progress: ProgressCallback = None) -> tuple[float, int]:
    """(mean loss, tokens) over the response tokens of encoded (ids, prompt length) records."""
    model.eval()
    device = model.output_weight.device
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        x, y = instruction_collate(encoded[i: i + batch_size], pad_id=pad_id,
                                   max_length=model.config.context_length, mask_prompt=True)
        y = y.to(device)
        response = y != -100
        total += _summed_loss(model, model.hidden_states(x.to(device))[response], y[response])
        count += int(response.sum())
        report_progress(progress, min(i + batch_size, len(encoded)), len(encoded))
    if count == 0:
        raise ValueError("no response token fits in the context: nothing to score")
    return total / count, count


def generate_responses(model: GPT, tokenizer: Tokenizer, records: list[dict], max_new_tokens: int,
                       batch_size: int = 8, progress: ProgressCallback = None) -> list[str]:
    """Greedy answers to each record's Alpaca prompt, up to <|endoftext|> or the next '###' section."""
    model.eval()
    prompts = []
    for record in records:
        # the prompt as encode_instruction encodes it for training, up to the response text
        ids = tokenizer.encode(format_prompt(record) + format_response({**record, "output": ""}),
                               allow_special=False)
        prompts.append(ids[-(model.config.context_length - 1):])  # keep room for at least one new token
    answers = []
    for i in range(0, len(prompts), batch_size):
        outputs = generate_batch(model, prompts[i: i + batch_size], max_new_tokens, eos_id=tokenizer.eot_id)
        for ids in outputs:
            if ids and ids[-1] == tokenizer.eot_id:
                ids = ids[:-1]
            answers.append(tokenizer.decode(ids).split(NEXT_SECTION)[0].strip())
        report_progress(progress, min(i + batch_size, len(prompts)), len(prompts))
    return answers


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (as SQuAD scores answers)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(response: str, reference: str) -> float:
    return float(normalize_answer(response) == normalize_answer(reference))


def token_f1(response: str, reference: str) -> float:
    """F1 of the normalized words the response shares with the reference (each counted as often as both
    hold it); 1.0 when both are empty."""
    ours, theirs = normalize_answer(response).split(), normalize_answer(reference).split()
    if not ours or not theirs:
        return float(ours == theirs)
    shared = sum((Counter(ours) & Counter(theirs)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(ours), shared / len(theirs)
    return 2 * precision * recall / (precision + recall)


# The book's chapter-7 judge prompt; the instruction part is the Alpaca prompt the model answered.
JUDGE_PROMPT = ("Given the input `{prompt}` and correct output `{reference}`, score the model response "
                "`{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")


def judge_prompt(record: dict, response: str) -> str:
    return JUDGE_PROMPT.format(prompt=format_prompt(record), reference=record["output"], response=response)


def parse_judge_score(reply: str) -> int | None:
    """The first whole number in a judge's reply if it is a score from 0 to 100, else None."""
    match = re.search(r"\d+", reply)
    if match is None or int(match.group()) > 100:
        return None
    return int(match.group())
