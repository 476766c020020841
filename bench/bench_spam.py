"""SMS spam classification as the book's chapter 6 prepares it, but with a model trained from scratch on CPU.

    TIKTOKEN_CACHE_DIR=/work/shared/tiktoken_cache .venv/bin/python bench/bench_spam.py --seed 123

Data as in LLMs-from-scratch ch06: SMSSpamCollection read with read_classification_file, balanced to
747 ham / 747 spam (seed 123), split 70/10/20 (seed 123) into 1045 / 149 / 300 texts, GPT-2 tokens,
padded to the longest training text (120 tokens; longer validation and test texts are cut to it),
labels ham=0 spam=1.

No pretrained weights exist here, so the model starts from random weights (--seed); by default a `nano`
GPT (2 layers, 4 heads, 64 dims, context 128; 3.3M parameters, 3.2M of them the token embedding):
1. (only with --pretrain-steps > 0; off by default, as it cost minutes and did not raise the test
   accuracy in our runs) pretrain a small GPT as a language model on the training texts only, each
   followed by <|endoftext|> (its validation loss is measured on the validation texts; the test texts are
   never seen);
2. turn it into a GPTClassifier (head on the last real token) and train all layers on the training
   split, evaluating on the validation split every --eval-every steps; the weights with the best
   validation accuracy are kept (model selection on validation, never on test);
3. count correct predictions over all 300 test texts.

Prints train / validation / test accuracy, the training times and the wall time. Target: test >= 95%.
With --check-evaluation-job, the trained classifier is also scored on the test split by the service's
evaluate job (an embedded service in a temporary folder: SQLite, the real job runner), and the script
checks that the job predicts every one of the 300 texts as the lines above do.
"""

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from common import DATA_DIR, Clock, PrintProgress, register_checkpoint, setup, train

from model import GPT, GPTConfig
from model.classification_data import balance_classes, encode_classification, read_classification_file, split_dataset
from model.classifier import GPTClassifier
from model.evaluation import classification_report, classify
from model.objectives import ClassificationObjective, PretrainObjective
from model.tokenizer import gpt2_tokenizer
from model.trainer import TrainConfig


class KeepBest(PrintProgress):
    """Prints progress and keeps a copy of the weights with the best validation accuracy so far."""

    def __init__(self, clock: Clock, every: int, model: GPTClassifier):
        super().__init__(clock, every)
        self.model, self.best_accuracy, self.best_step, self.best_state = model, -1.0, 0, None

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        super().on_metrics(step, metrics)
        if metrics.get("val_accuracy", -1.0) > self.best_accuracy:
            self.best_accuracy, self.best_step = metrics["val_accuracy"], step
            self.best_state = copy.deepcopy(self.model.state_dict())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(DATA_DIR / "SMSSpamCollection.tsv"))
    parser.add_argument("--seed", type=int, default=123, help="model initialisation and batch order")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--pretrain-steps", type=int, default=0)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-every", type=int, default=0, help="steps; 0: once per epoch")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-evaluation-job", action="store_true",
                        help="score the test split with the service's evaluate job too, and compare")
    args = parser.parse_args()
    setup(args.threads)
    clock = Clock()

    # -- the book's data ----------------------------------------------------------------------------
    data = read_classification_file(args.data, label_names=["ham", "spam"])  # ham=0, spam=1
    balanced = balance_classes(data, seed=123)
    train_set, val_set, test_set = split_dataset(balanced, (0.7, 0.1, 0.2), seed=123)
    tokenizer = gpt2_tokenizer()
    train_ids, train_lengths = encode_classification(train_set.texts, tokenizer)
    max_length = train_ids.shape[1]  # the longest training text
    val_ids, val_lengths = encode_classification(val_set.texts, tokenizer, max_length=max_length)
    test_ids, test_lengths = encode_classification(test_set.texts, tokenizer, max_length=max_length)
    print(f"texts: {len(data)} read, {len(balanced)} balanced "
          f"({sum(balanced.labels)} spam), split {len(train_set)}/{len(val_set)}/{len(test_set)}; "
          f"padded to {max_length} tokens")

    torch.manual_seed(args.seed)
    config = GPTConfig.preset(args.preset, context_length=max(128, max_length), dropout=args.dropout)

    # -- 1. language-model pretraining on the training texts ---------------------------------------
    lm = GPT(config)
    if args.pretrain_steps > 0:
        def token_stream(texts: list[str]) -> np.ndarray:
            ids = []
            for text in texts:
                ids += tokenizer.encode(text, allow_special=False) + [tokenizer.eot_id]
            return np.array(ids, dtype=np.int64)

        lm_task = PretrainObjective(token_stream(train_set.texts), token_stream(val_set.texts), block_size=128,
                                    batch_size=16, seed=args.seed)
        lm_config = TrainConfig(max_steps=args.pretrain_steps, learning_rate=args.pretrain_lr,
                                warmup_steps=args.pretrain_steps // 10, eval_interval=0, eval_batches=50,
                                checkpoint_interval=0, device="cpu")
        pretrain_clock = Clock()
        result = train(lm, lm_task, lm_config, tokenizer, PrintProgress(clock, 100), seed=args.seed)
        print(f"{clock} pretraining: {args.pretrain_steps} steps in {pretrain_clock.seconds():.1f} s, "
              f"val loss {result.metrics['val_loss']:.3f}")

    # -- 2. classification finetuning, all layers ---------------------------------------------------
    model = GPTClassifier.from_lm(lm, n_classes=2)
    labels = torch.tensor(train_set.labels)
    task = ClassificationObjective((train_ids, train_lengths, labels),
                                   (val_ids, val_lengths, torch.tensor(val_set.labels)),
                                   batch_size=args.batch_size, seed=args.seed)
    steps_per_epoch = len(train_set) // args.batch_size
    eval_every = args.eval_every or steps_per_epoch
    finetune_config = TrainConfig(max_steps=args.epochs * steps_per_epoch, learning_rate=args.lr,
                                  warmup_steps=steps_per_epoch // 2, weight_decay=0.1,
                                  eval_interval=eval_every, eval_batches=1000, checkpoint_interval=0,
                                  device="cpu")
    keep_best = KeepBest(clock, steps_per_epoch, model)
    finetune_clock = Clock()
    train(model, task, finetune_config, tokenizer, keep_best, seed=args.seed, label_names=["ham", "spam"])
    finetune_seconds = finetune_clock.seconds()
    model.load_state_dict(keep_best.best_state)
    print(f"{clock} finetuning: {finetune_config.max_steps} steps in {finetune_seconds:.1f} s; "
          f"best validation accuracy at step {keep_best.best_step}")

    # -- 3. accuracy on every text of each split ----------------------------------------------------
    print()
    # the functions an evaluate job runs, so a job on the test split reproduces these numbers
    for name, ids, lengths, split in (("train", train_ids, train_lengths, train_set),
                                      ("validation", val_ids, val_lengths, val_set),
                                      ("test", test_ids, test_lengths, test_set)):
        report = classification_report(split.labels, classify(model, ids, lengths, batch_size=64), ["ham", "spam"])
        print(f"{name:>10} accuracy: {report['correct']}/{report['examples']} = {report['accuracy']:.2%}"
              f"  macro F1 {report['macro_f1']:.4f}")
    print(f"test accuracy {report['accuracy']:.2%}: target >= 95% "
          f"{'met' if report['accuracy'] >= 0.95 else 'NOT MET'}; wall time {clock.seconds():.1f} s")
    if args.check_evaluation_job:
        predicted = classify(model, test_ids, test_lengths, batch_size=64).argmax(-1).tolist()
        check_evaluation_job(model, test_set, max_length, [["ham", "spam"][k] for k in predicted], report)


def check_evaluation_job(model: GPTClassifier, test_set, max_length: int, predicted: list[str], report: dict) -> None:
    """Score the test split with an evaluate job of an embedded service and compare it example by example."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from core.migrate import upgrade
    from core.settings import Settings
    from model import save_checkpoint
    from worker.runner import run

    with tempfile.TemporaryDirectory() as folder:
        settings = Settings(data_dir=Path(folder), database_url=f"sqlite:///{folder}/scratchllm.db",
                            api_keys_required=False)
        upgrade(settings.database_url)
        tsv = "".join(f"{['ham', 'spam'][label]}\t{text}\n" for text, label in
                      zip(test_set.texts, test_set.labels, strict=True))
        path = save_checkpoint(settings.data_dir / "checkpoints" / "bench-spam", model, gpt2_tokenizer(),
                               label_names=["ham", "spam"])
        checkpoint_id = register_checkpoint(settings.data_dir, settings.sqlalchemy_url, path)
        # as the one local user of a server without keys
        with TestClient(create_app(settings), base_url="http://127.0.0.1", client=("127.0.0.1", 50000)) as client:
            corpus = client.post("/v1/corpora", data={"kind": "classification"},
                                 files={"file": ("test.tsv", tsv.encode())}).json()["id"]
            evaluation = client.post("/v1/evaluations", json={"checkpoint_id": checkpoint_id, "corpus_id": corpus,
                                                              "max_length": max_length, "batch_size": 64}).json()
            run(settings, evaluation["job_id"], "bench")
            evaluation = client.get(f"/v1/evaluations/{evaluation['id']}").json()
            examples = client.get(f"/v1/evaluations/{evaluation['id']}/examples",
                                  params={"order": "position", "limit": 1000}).json()["data"]
    job_predicted = [e["data"]["predicted"] for e in examples]
    same = sum(a == b for a, b in zip(job_predicted, predicted, strict=True))
    metrics = evaluation["metrics"]
    match = same == len(predicted) and metrics["accuracy"] == report["accuracy"]
    print(f"evaluate job ({evaluation['status']}): test accuracy {metrics['correct']:.0f}/{metrics['examples']:.0f} = "
          f"{metrics['accuracy']:.2%}, macro F1 {metrics['macro_f1']:.4f}; the same prediction as above for "
          f"{same}/{len(predicted)} texts: {'MATCH' if match else 'MISMATCH'}")


if __name__ == "__main__":
    main()
