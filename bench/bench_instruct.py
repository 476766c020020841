"""Instruction finetuning as in the book's chapter 7, with a small GPT trained from scratch on CPU.

    TIKTOKEN_CACHE_DIR=/work/shared/tiktoken_cache .venv/bin/python bench/bench_instruct.py

Data as in LLMs-from-scratch ch07: instruction-data.json (1100 Alpaca records) split without shuffling
into train = the first 85% (935), test = the next 10% (110), validation = the rest (55); each record is
the Alpaca prompt plus "### Response:" and the output (model.instruction_data), batched with the book's
collate (one <|endoftext|> target after each text, padding targets ignored, prompt tokens not masked).

No pretrained weights exist here, so the model is a `small` GPT (6 layers, 6 heads, 384 dims, context
128, dropout 0.1) from random weights, trained with InstructionObjective for --steps steps. Prints the
validation loss before and after training (it must fall), and greedy responses to the first --show
test instructions (never trained on), cut at <|endoftext|> or a "### " stop string; and the wall time.
"""

import argparse
import contextlib

import torch
from common import DATA_DIR, Clock, PrintProgress, setup, train

from model import GPT, GPTConfig
from model.generate import stream_generate
from model.instruction_data import encode_instruction, format_prompt, read_instruction_file
from model.objectives import InstructionObjective
from model.tokenizer import gpt2_tokenizer
from model.trainer import TrainConfig


def respond(model: GPT, tokenizer, record: dict, max_new_tokens: int) -> tuple[str, str]:
    """(greedy response text, why it ended) to a record's instruction and input."""
    prompt = tokenizer.encode(format_prompt(record) + "\n\n### Response:\n", allow_special=False)
    text, reason = "", None
    for event in stream_generate(model, tokenizer, prompt, max_new_tokens, eos_id=tokenizer.eot_id,
                                 stop=["### "]):
        text += event.text
        reason = event.finish_reason or reason
    return text.strip(), reason


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA_DIR / "instruction-data.json"))
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--show", type=int, default=3, help="test instructions to answer")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    clock = Clock()

    records = read_instruction_file(args.data)
    n_train, n_test = int(len(records) * 0.85), int(len(records) * 0.1)  # the book's split, no shuffle
    train_records = records[:n_train]
    test_records = records[n_train: n_train + n_test]
    val_records = records[n_train + n_test:]
    tokenizer = gpt2_tokenizer()
    train_encoded = [encode_instruction(r, tokenizer) for r in train_records]
    val_encoded = [encode_instruction(r, tokenizer) for r in val_records]
    longest = max(len(ids) for ids, _ in train_encoded + val_encoded)
    print(f"records: {len(train_records)} train, {len(test_records)} test, {len(val_records)} validation; "
          f"longest {longest} tokens")

    torch.manual_seed(args.seed)
    config = GPTConfig.preset(args.preset, context_length=128, dropout=0.1)
    model = GPT(config)
    print(f"model: {args.preset}, {model.num_parameters() / 1e6:.1f}M parameters, from random weights")

    task = InstructionObjective(train_encoded, val_encoded, batch_size=args.batch_size, seed=args.seed,
                                pad_id=tokenizer.eot_id, max_length=config.context_length)
    model.eval()
    with torch.no_grad():
        before = task.evaluate(model, max_batches=1000, autocast=contextlib.nullcontext)["val_loss"]
    print(f"validation loss before training: {before:.3f}")

    train_config = TrainConfig(max_steps=args.steps, learning_rate=args.lr, warmup_steps=args.steps // 10,
                               weight_decay=0.1, eval_interval=100, eval_batches=1000, checkpoint_interval=0,
                               device="cpu")
    train_clock = Clock()
    result = train(model, task, train_config, tokenizer, PrintProgress(clock, 50), seed=args.seed)
    train_seconds = train_clock.seconds()
    after = result.metrics["val_loss"]

    model.eval()
    print()
    for record in test_records[: args.show]:
        response, reason = respond(model, tokenizer, record, max_new_tokens=60)
        print(f"### Instruction: {record['instruction']}")
        if record["input"]:
            print(f"### Input: {record['input']}")
        print(f"--- expected: {record['output']}")
        print(f"--- model ({reason}): {response}")
        print()
    print(f"validation loss: {before:.3f} before, {after:.3f} after ({'fell' if after < before else 'DID NOT FALL'})")
    print(f"training: {args.steps} steps of {args.batch_size} in {train_seconds:.1f} s; "
          f"wall time {clock.seconds():.1f} s")


if __name__ == "__main__":
    main()
