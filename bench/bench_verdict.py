"""The book's chapter-5 pretraining run: GPT-2 124M from scratch on "The Verdict", 10 epochs, on CPU.

    TIKTOKEN_CACHE_DIR=/work/shared/tiktoken_cache .venv/bin/python bench/bench_verdict.py

Setup as in LLMs-from-scratch ch05 (train_model_simple): the text split 90/10 by characters and each part
tokenized with the GPT-2 tokenizer; windows of 256 tokens, stride 256, batch 2, shuffled each epoch, the
last incomplete batch dropped; the 124M config with context 256, dropout 0.1, no QKV bias; AdamW lr 4e-4
constant, weight decay 0.1, betas (0.9, 0.999) (torch's default, which the book uses), no gradient
clipping, 10 epochs, torch.manual_seed(123).

What differs from the book: the Trainer's AdamW does not decay biases and LayerNorm weights. --head untied
(the default) is the book's GPTModel: a separate output layer (163M parameters) and PyTorch's default init
(book_init); --head tied ties the LM head to the token embedding as GPT-2 does (124M), keeping the book's
init as far as a tied head allows; --init gpt2 keeps the library's GPT-2 init, with which this run stalls
near loss 6. --family llama (or qwen3) builds the same 124M shape with that family's options, as the llama-*
presets do (rotary positions, RMSNorm, SwiGLU, no biases, 6 key/value heads for 12 query heads; qwen3 adds
QK-norm).

Prints the training loss (the book's calc_loss_loader: every training window, model in eval mode; also the
mean of the last epoch's batch losses, in train mode with dropout), the validation loss, a greedy
25-token sample from "Every effort moves you", and the wall time. Book: train 0.57, val 6.37 (targets
here: train < 1, val < 7).
"""

import argparse
import math

import numpy as np
import torch
from common import DATA_DIR, Clock, PrintProgress, setup, train
from torch import nn

from model import GPT, GPTConfig
from model.config import LLAMA, PRESETS, QWEN3
from model.data import n_windows, windows_at
from model.generate import generate
from model.objectives import PretrainObjective
from model.tokenizer import gpt2_tokenizer
from model.trainer import TrainConfig

# The Llama / Qwen3 options at GPT-2 124M's size, with half as many key/value heads as the llama-* presets have
FAMILIES = {"gpt2": {}, **{family: {**options, "n_kv_head": PRESETS["gpt2"]["n_head"] // 2}
                           for family, options in (("llama", LLAMA), ("qwen3", QWEN3))}}


def mean_loss(model: GPT, tokens: np.ndarray, block_size: int, batch_size: int) -> float:
    """The book's calc_loss_loader over all windows of `tokens` (stride = block_size), in eval mode:
    the mean of the per-batch mean losses."""
    starts = np.arange(n_windows(len(tokens), block_size, block_size)) * block_size
    model.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            x, y = windows_at(tokens, starts[i: i + batch_size], block_size)
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def book_init(model: GPT) -> None:
    """Initialise like the book's GPTModel: PyTorch's defaults.

    Token and position embeddings are nn.Embedding's N(0, 1) and linear layers, the output layer
    included, have nn.Linear's Kaiming-uniform init: the first logits have a standard deviation of about
    0.58. Large embeddings are what let the model memorise the 4.6k training tokens in 90 steps: with
    GPT-2's N(0, 0.02) init, Adam's updates of size lr soon outweigh each token's random embedding and
    training stalls near the unigram loss (about 6). A tied head is the N(0, 1) embedding itself, so the
    final LayerNorm's gain is set to 1 / sqrt(3 * n_embd), the output layer's weight std, to start from
    the same logit scale.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            module.reset_parameters()
    if model.lm_head is None:
        model.ln_f.weight.fill_(1 / math.sqrt(3 * model.config.n_embd))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA_DIR / "the-verdict.txt"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--init", choices=("book", "gpt2"), default="book",
                        help="book: the book's embedding and linear init (see book_init); gpt2: the library's")
    parser.add_argument("--head", choices=("untied", "tied"), default="untied",
                        help="untied: a separate output layer, as in the book; tied: GPT-2's tied LM head")
    parser.add_argument("--family", choices=tuple(FAMILIES), default="gpt2",
                        help="llama / qwen3: the 124M shape with that family's options, as the llama-* presets")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    clock = Clock()

    block_size, batch_size, stride = 256, 2, 256
    tokenizer = gpt2_tokenizer()
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    split = int(0.9 * len(text))  # the book splits the characters, then tokenizes each part
    train_tokens = np.array(tokenizer.encode(text[:split]), dtype=np.int64)
    val_tokens = np.array(tokenizer.encode(text[split:]), dtype=np.int64)
    batches_per_epoch = n_windows(len(train_tokens), block_size, stride) // batch_size  # drop_last=True
    max_steps = args.epochs * batches_per_epoch
    print(f"tokens: {len(train_tokens)} train, {len(val_tokens)} val; {batches_per_epoch} batches of "
          f"{batch_size}x{block_size} per epoch, {max_steps} steps")

    torch.manual_seed(args.seed)
    config = GPTConfig.preset("gpt2", **{**FAMILIES[args.family], "context_length": 256, "dropout": 0.1,
                                         "qkv_bias": False, "tie_embeddings": args.head == "tied"})
    model = GPT(config)
    if args.init == "book":
        book_init(model)
    print(f"init: {args.init}; model: {args.family}, {model.num_parameters() / 1e6:.1f}M parameters "
          f"({args.head} LM head)")
    print(f"before: train loss {mean_loss(model, train_tokens, block_size, batch_size):.3f}, "
          f"val loss {mean_loss(model, val_tokens, block_size, batch_size):.3f}")

    task = PretrainObjective(train_tokens, val_tokens, block_size, batch_size, seed=args.seed, stride=stride)
    train_config = TrainConfig(max_steps=max_steps, learning_rate=4e-4, min_learning_rate=4e-4,
                               warmup_steps=0, weight_decay=0.1, beta1=0.9, beta2=0.999, grad_clip=None,
                               eval_interval=batches_per_epoch, eval_batches=1000, checkpoint_interval=0,
                               device="cpu")
    train_clock = Clock()
    result = train(model, task, train_config, tokenizer, PrintProgress(clock, batches_per_epoch),
                   seed=args.seed)
    train_seconds = train_clock.seconds()

    last_epoch = result.train_losses[-batches_per_epoch:]
    train_loss = mean_loss(model, train_tokens, block_size, batch_size)
    val_loss = mean_loss(model, val_tokens, block_size, batch_size)
    prompt = tokenizer.encode("Every effort moves you")
    model.eval()
    out = generate(model, torch.tensor([prompt]), max_new_tokens=25)  # greedy
    sample = tokenizer.decode(out[0].tolist())

    print()
    print(f"train loss (all {batches_per_epoch * batch_size} train windows, eval mode): {train_loss:.3f}"
          f"   target < 1 (book 0.57)")
    print(f"train loss (mean of the last epoch's {len(last_epoch)} batches, train mode): "
          f"{sum(last_epoch) / len(last_epoch):.3f}")
    print(f"val loss: {val_loss:.3f}   target < 7 (book 6.37);  Trainer's val_loss "
          f"{result.metrics['val_loss']:.3f}")
    print(f"greedy sample: {sample!r}")
    print(f"training time {train_seconds:.1f} s ({train_seconds / max_steps:.2f} s/step), "
          f"wall time {clock.seconds():.1f} s")
    ok = train_loss < 1 and val_loss < 7
    print("targets met" if ok else "TARGETS NOT MET")


if __name__ == "__main__":
    main()
