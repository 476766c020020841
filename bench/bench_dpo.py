"""Preference tuning with DPO (the book's chapter-7 bonus), after instruction finetuning, on CPU.

    TIKTOKEN_CACHE_DIR=/work/shared/tiktoken_cache .venv/bin/python bench/bench_dpo.py

Data: instruction-data.json (1100 Alpaca records) in the book's split without shuffling: the first 85%
(935) train, the rest (165, the book's test and validation records) are held out of both finetunes.
Each record becomes a preference pair: chosen is its own answer; rejected is the answer of the record
half its split away (record i of a split of n takes record (i + n // 2) mod n's output). The rejected
answer is a fluent, complete answer of the same style, its length drawn from the same distribution,
right for another instruction and wrong for this one: the pair differs in relevance, with no truncation or
word salad that would teach the model something easier than "answer what was asked". Many answers reuse
the instruction's or input's words (rewrite, convert, translate, name the capital of ...), which a small
model can learn to look for. Held-out pairs take their rejected answers from held-out records too.
Relevance is hard for a 7M-parameter model trained on 935 records: expect held-out accuracy around 70%,
not 100%. The reference-free numbers barely move: a sum of log-probabilities mostly measures length,
which the reference cancels out.

No pretrained weights exist here, so the bench trains its own instruction model: a `mini` GPT (4 layers,
4 heads, 128 dims, context 128, no dropout) from random weights, instruction-finetuned on the 935
training records (InstructionObjective, as bench_instruct). That model is DPO's policy and its frozen
reference: the reference log-probabilities of every pair are computed once, then DPO trains on the 935
training pairs (DPOObjective, beta 0.1, learning rate 1e-4 decaying to 1e-5).

Prints, on the 165 held-out pairs: before DPO and every --eval-every steps, DPO's preference accuracy
(margin > 0; 0 before DPO, when every margin is 0) and mean reward margin, which should pass 50% and
grow; and before and after DPO, how often the model itself finds the chosen answer more likely
(reference-free, margins beta * (log p(chosen) - log p(rejected))). Then the wall time.
"""

import argparse
import contextlib

import torch
from common import DATA_DIR, Clock, PrintProgress, setup, train

from model import GPT, GPTConfig
from model.dpo import DPOObjective, pair_logprobs, preference_scores
from model.instruction_data import encode_instruction, read_instruction_file
from model.objectives import InstructionObjective
from model.preference_data import encode_preference
from model.tokenizer import gpt2_tokenizer
from model.trainer import TrainConfig


class PrintEvaluations(PrintProgress):
    """PrintProgress without the throughput the Trainer reports every step."""

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if "val_loss" in metrics:
            super().on_metrics(step, metrics)


def preference_records(records: list[dict]) -> list[dict]:
    """Chosen: a record's own answer; rejected: the answer of the record half the list away."""
    half = len(records) // 2
    return [{"instruction": r["instruction"], "input": r["input"], "chosen": r["output"],
             "rejected": records[(i + half) % len(records)]["output"]} for i, r in enumerate(records)]


def show(clock: Clock, label: str, scores) -> None:
    print(f"{clock} {label}: preference accuracy {scores.accuracy:.1%}, mean reward margin "
          f"{scores.mean_margin:+.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA_DIR / "instruction-data.json"))
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--dpo-steps", type=int, default=120)
    parser.add_argument("--dpo-lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    clock = Clock()

    records = read_instruction_file(args.data)
    n_train = int(len(records) * 0.85)  # the book's split, no shuffle
    train_records, held_out = records[:n_train], records[n_train:]
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(args.seed)
    config = GPTConfig.preset(args.preset, context_length=128, dropout=0.0)
    model = GPT(config)
    print(f"records: {len(train_records)} train, {len(held_out)} held out; model: {args.preset}, "
          f"{model.num_parameters() / 1e6:.1f}M parameters, from random weights")

    sft = InstructionObjective([encode_instruction(r, tokenizer) for r in train_records],
                               [encode_instruction(r, tokenizer) for r in held_out], batch_size=args.batch_size,
                               seed=args.seed, pad_id=tokenizer.eot_id, max_length=config.context_length)
    sft_config = TrainConfig(max_steps=args.sft_steps, learning_rate=args.sft_lr, warmup_steps=args.sft_steps // 10,
                             eval_interval=0, eval_batches=1000, checkpoint_interval=0, device="cpu")
    print(f"{clock} instruction finetuning: {args.sft_steps} steps")
    result = train(model, sft, sft_config, tokenizer, PrintEvaluations(clock, 100), seed=args.seed)
    print(f"{clock} instruction model: held-out response loss {result.metrics['val_loss']:.3f}")

    train_pairs = [encode_preference(r, tokenizer, config.context_length)
                   for r in preference_records(train_records)]
    val_pairs = [encode_preference(r, tokenizer, config.context_length) for r in preference_records(held_out)]
    # the reference: the instruction model, frozen, computed once with the batching evaluation uses
    train_reference = pair_logprobs(model, train_pairs, tokenizer.eot_id, args.batch_size)
    val_reference = pair_logprobs(model, val_pairs, tokenizer.eot_id, args.batch_size)
    print(f"{clock} reference log-probabilities of {len(train_pairs)} + {len(val_pairs)} pairs")
    dpo = DPOObjective(train_pairs, val_pairs, train_reference, val_reference, batch_size=args.batch_size,
                       seed=args.seed, pad_id=tokenizer.eot_id, beta=args.beta)
    own_before = preference_scores(model, val_pairs, None, args.beta, tokenizer.eot_id, args.batch_size)
    show(clock, "held out, reference-free, before DPO", own_before)
    with torch.no_grad():
        before = dpo.evaluate(model, max_batches=1000, autocast=contextlib.nullcontext)
    print(f"{clock} step     0  " + "  ".join(f"{k} {v:.4f}" for k, v in before.items()), flush=True)

    dpo_config = TrainConfig(max_steps=args.dpo_steps, learning_rate=args.dpo_lr, eval_interval=args.eval_every,
                             eval_batches=1000, checkpoint_interval=0, device="cpu")
    train_clock = Clock()
    result = train(model, dpo, dpo_config, tokenizer, PrintEvaluations(clock, args.eval_every), seed=args.seed)
    dpo_seconds = train_clock.seconds()
    own_after = preference_scores(model, val_pairs, None, args.beta, tokenizer.eot_id, args.batch_size)
    show(clock, "held out, reference-free, after DPO", own_after)
    after = result.metrics
    print(f"held-out preference accuracy {before['val_preference_accuracy']:.1%} -> "
          f"{after['val_preference_accuracy']:.1%}, mean reward margin {before['val_reward_margin']:+.4f} -> "
          f"{after['val_reward_margin']:+.4f}; reference-free {own_before.accuracy:.1%} -> {own_after.accuracy:.1%}")
    print(f"DPO: {args.dpo_steps} steps of {args.batch_size} pairs in {dpo_seconds:.1f} s; "
          f"wall time {clock.seconds():.1f} s")


if __name__ == "__main__":
    main()
