"""Running an evaluate job: score a checkpoint on a corpus, then store the numbers and the scored examples.

An evaluation that is stopped (cancelled, or its worker shutting down) keeps nothing; run again, it starts
over and writes the same numbers: every step is deterministic.
"""

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, insert, select, update

from core.checkpoints import base_dir
from core.db import Database, utcnow
from core.enums import EvaluationKind
from core.sealing import unseal
from core.settings import Settings
from core.tables import Checkpoint, Corpus, Evaluation, EvaluationExample
from model import (
    TrainProgress,
    encode_classification,
    encode_instruction,
    load_checkpoint,
    merge_lora,
    perplexity,
    read_classification_file,
    read_instruction_file,
)
from model.dpo import preference_scores
from model.evaluation import (
    EvaluationStopped,
    classification_report,
    classify,
    exact_match,
    generate_responses,
    response_loss,
    score_tokens,
    scoring_windows,
    token_byte_lengths,
    token_f1,
)
from model.lora import has_lora
from model.preference_data import encode_preference, preference_prompt, read_preference_file
from worker.judge import Judge, JudgeError
from worker.reporting import JobReporter
from worker.training import corpus_tokens, pool_device

EXAMPLE_TEXT_CHARS = 2000  # stored examples keep this much of each text
INSERT_CHUNK = 500


@dataclass
class Target:
    """What an evaluate job scores, as read from the database."""

    evaluation_id: str
    kind: str
    settings: dict
    judge_api_key: str | None
    judge_allowed_hosts: list[str]
    checkpoint_path: Path
    corpus_path: Path
    base_path: Path | None = None  # an adapter-only checkpoint's base


@dataclass
class Outcome:
    metrics: dict[str, float]
    details: dict
    examples: list[dict]  # rows of EvaluationExample without evaluation_id


class Steps:
    """The phases of an evaluation as one step count for the job's progress, and its stop check. A step is
    what each phase counts: a scoring window, a text, a record."""

    def __init__(self, reporter: JobReporter, totals: list[int]):
        self.reporter, self.totals, self.total = reporter, totals, sum(totals)
        self.started = time.monotonic()
        self._report(0, eta_s=None)  # a fresh reporter writes at once: the job shows its total

    def _report(self, step: int, eta_s: float | None) -> None:
        self.reporter.on_progress(TrainProgress(step=step, total_steps=self.total, tokens_seen=0, tokens_per_s=None,
                                                eta_s=eta_s, train_loss=None, learning_rate=0.0))

    def phase(self, index: int):
        offset = sum(self.totals[:index])

        def progress(done: int, _total: int) -> bool:
            step = offset + done
            self._report(step, eta_s=(time.monotonic() - self.started) / step * (self.total - step))
            return self.reporter.should_stop()

        return progress


def _read_target(database: Database, settings: Settings, job_id: str) -> Target:
    with database.session() as session:
        evaluation = session.scalar(select(Evaluation).where(Evaluation.job_id == job_id))
        if evaluation is None:
            raise ValueError(f"job {job_id} has no evaluation row")
        checkpoint = session.get(Checkpoint, evaluation.checkpoint_id) if evaluation.checkpoint_id else None
        if checkpoint is None:
            raise ValueError("the checkpoint was deleted before the evaluation ran")
        corpus = session.get(Corpus, evaluation.corpus_id)
        sealed_key = (evaluation.job.spec.get("judge") or {}).get("api_key")
        return Target(evaluation.id, evaluation.kind, evaluation.settings,
                      sealed_key and unseal(settings, sealed_key), settings.judge_allowed_hosts,
                      settings.storage.checkpoint_dir(checkpoint.path),
                      settings.storage.corpus_file(corpus.id, corpus.format),
                      base_dir(session, settings.storage, checkpoint))


def _lm(model, tokenizer, target: Target, steps_for, work: Path) -> Outcome:
    s = target.settings
    work.mkdir(parents=True, exist_ok=True)
    try:  # the token file is only for this run
        tokens = corpus_tokens(target.corpus_path, tokenizer, work / "corpus.bin")
        if s["max_tokens"] is not None:
            tokens = tokens[: s["max_tokens"]]
        if len(tokens) < 1:
            raise ValueError("the corpus has no tokens to score")
        windows = len(scoring_windows(len(tokens) + 1, s["block_size"], s["stride"]))
        steps = steps_for([windows])
        score = score_tokens(model, tokens, token_byte_lengths(tokenizer), s["block_size"], s["stride"],
                             s["batch_size"], bos_id=tokenizer.eot_id, progress=steps.phase(0))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Outcome(score.metrics(), {"windows": windows, "tokenizer": tokenizer.name}, [])


def _worst(examples: list[dict], n: int) -> list[dict]:
    return [{"position": e["position"], "score": e["score"], **e["data"]}
            for e in sorted(examples, key=lambda e: (e["score"], e["position"]))[:n]]


def _classifier(model, tokenizer, meta: dict, target: Target, steps_for) -> Outcome:
    s, label_names = target.settings, meta["label_names"]
    data = read_classification_file(target.corpus_path, label_names=label_names)
    texts, labels = data.texts[: s["max_examples"]], data.labels[: s["max_examples"]]
    ids, lengths = encode_classification(texts, tokenizer, max_length=s["max_length"], pad_id=tokenizer.eot_id)
    steps = steps_for([len(texts)])
    probabilities = classify(model, ids, lengths, s["batch_size"], progress=steps.phase(0))
    report = classification_report(labels, probabilities, label_names)
    examples = []
    for position, (text, label, row) in enumerate(zip(texts, labels, probabilities.tolist(), strict=True)):
        predicted = max(range(len(row)), key=row.__getitem__)
        examples.append({"position": position, "score": row[label], "data": {
            "text": text[:EXAMPLE_TEXT_CHARS], "label": label_names[label], "predicted": label_names[predicted],
            "correct": predicted == label, "probabilities": dict(zip(label_names, row, strict=True))}})
    metrics = {name: report[name] for name in ("accuracy", "macro_f1", "loss", "correct", "examples")}
    details = {"label_names": label_names, "per_class": report["per_class"],
               "confusion_matrix": report["confusion_matrix"], "worst_examples": _worst(examples, s["worst_examples"])}
    return Outcome(metrics, details, examples)


def _judge(target: Target, records: list[dict], responses: list[str], progress) -> tuple[list, dict]:
    """Scores (None where the reply held none) and what `details` records of the judge."""
    settings = target.settings["judge"]
    judge = Judge(settings["url"], settings["model"], target.judge_api_key, settings["timeout_s"],
                  target.judge_allowed_hosts)
    record = {key: settings[key] for key in ("url", "model", "prompt")}
    scores = []
    try:
        for i, (example, response) in enumerate(zip(records, responses, strict=True)):
            scores.append(judge.rate(example, response))
            if progress(i + 1, len(records)):
                raise EvaluationStopped(f"stopped after judging {i + 1} responses")
    except JudgeError as e:  # the other numbers stand; the judge's failure is part of the results
        record["error"] = str(e)
    finally:
        judge.close()
    record["scored"] = sum(score is not None for score, _ in scores)
    record["unscored"] = len(scores) - record["scored"]
    return scores + [(None, None)] * (len(records) - len(scores)), record


def _instruct(model, tokenizer, target: Target, steps_for) -> Outcome:
    s = target.settings
    records = read_instruction_file(target.corpus_path)[: s["max_examples"]]
    encoded = [encode_instruction(r, tokenizer) for r in records]
    steps = steps_for([len(records), len(records), len(records) if s["judge"] else 0])
    loss, n_tokens = response_loss(model, encoded, tokenizer.eot_id, s["batch_size"], progress=steps.phase(0))
    model.pack_for_batches()
    responses = generate_responses(model, tokenizer, records, s["max_new_tokens"], s["batch_size"],
                                   progress=steps.phase(1))
    judged, judge_record = (_judge(target, records, responses, steps.phase(2)) if s["judge"]
                            else ([(None, None)] * len(records), None))
    examples = []
    for position, (record, response, (score, reply)) in enumerate(zip(records, responses, judged, strict=True)):
        f1 = token_f1(response, record["output"])
        data = {"instruction": record["instruction"][:EXAMPLE_TEXT_CHARS],
                "input": record["input"][:EXAMPLE_TEXT_CHARS], "reference": record["output"][:EXAMPLE_TEXT_CHARS],
                "response": response,
                "exact_match": exact_match(response, record["output"]), "token_f1": f1}
        if judge_record is not None:
            data.update(judge_score=score, judge_reply=reply)
        examples.append({"position": position, "score": f1, "data": data})
    metrics = {"response_loss": loss, "response_tokens": n_tokens, "examples": len(records),
               "exact_match": sum(e["data"]["exact_match"] for e in examples) / len(examples),
               "token_f1": sum(e["score"] for e in examples) / len(examples), "response_perplexity": perplexity(loss)}
    scores = [score for score, _ in judged if score is not None]
    if scores:
        metrics["judge_score"] = sum(scores) / len(scores)
    details = {"judge": judge_record, "worst_examples": _worst(examples, s["worst_examples"])}
    return Outcome(metrics, details, examples)


def _preference(model, tokenizer, target: Target, steps_for) -> Outcome:
    """How often the model finds a pair's chosen response likelier than its rejected one (its own log-probabilities,
    no reference: numbers that compare any checkpoints, a DPO model and its base among them)."""
    s = target.settings
    records = read_preference_file(target.corpus_path)[: s["max_examples"]]
    pairs = [encode_preference(r, tokenizer, s["max_length"]) for r in records]
    steps = steps_for([len(pairs)])
    scores = preference_scores(model, pairs, None, pad_id=tokenizer.eot_id, batch_size=s["batch_size"],
                               progress=steps.phase(0))
    examples = [{"position": position, "score": float(margin), "data": {
        "prompt": preference_prompt(record)[:EXAMPLE_TEXT_CHARS], "chosen": record["chosen"][:EXAMPLE_TEXT_CHARS],
        "rejected": record["rejected"][:EXAMPLE_TEXT_CHARS], "chosen_logprob": float(chosen),
        "rejected_logprob": float(rejected)}}
        for position, (record, margin, (chosen, rejected)) in enumerate(zip(
            records, scores.margins.tolist(), scores.logprobs.tolist(), strict=True))]
    metrics = {"preference_accuracy": scores.accuracy, "mean_margin": scores.mean_margin, "examples": len(pairs)}
    return Outcome(metrics, {"worst_examples": _worst(examples, s["worst_examples"])}, examples)


def _store(database: Database, evaluation_id: str, outcome: Outcome) -> None:
    # JSON has no NaN (a diverged model's loss): such a number is left out rather than stored
    outcome.metrics = {name: value for name, value in outcome.metrics.items() if math.isfinite(value)}
    with database.session() as session:
        # a re-run after a crash replaces whatever an earlier attempt left
        session.execute(delete(EvaluationExample).where(EvaluationExample.evaluation_id == evaluation_id))
        rows = [{**example, "evaluation_id": evaluation_id} for example in outcome.examples]
        for i in range(0, len(rows), INSERT_CHUNK):
            session.execute(insert(EvaluationExample), rows[i: i + INSERT_CHUNK])
        session.execute(update(Evaluation).where(Evaluation.id == evaluation_id).values(
            metrics=outcome.metrics, details=outcome.details, finished_at=utcnow()))


def evaluate(database: Database, settings: Settings, job_id: str, reporter: JobReporter) -> dict[str, float] | None:
    """Score the job's checkpoint on its corpus and store the results: the metrics, or None if stopped."""
    target = _read_target(database, settings, job_id)
    model, tokenizer, meta = load_checkpoint(target.checkpoint_path, base=target.base_path)
    if has_lora(model):
        merge_lora(model)
    model.to(pool_device(settings.worker_concurrency))

    def steps_for(totals: list[int]) -> Steps:
        return Steps(reporter, totals)

    try:
        if target.kind == EvaluationKind.LM:
            outcome = _lm(model, tokenizer, target, steps_for, settings.storage.job_work_dir(job_id))
        elif target.kind == EvaluationKind.CLASSIFIER:
            outcome = _classifier(model, tokenizer, meta, target, steps_for)
        elif target.kind == EvaluationKind.PREFERENCE:
            outcome = _preference(model, tokenizer, target, steps_for)
        else:
            outcome = _instruct(model, tokenizer, target, steps_for)
    except EvaluationStopped:
        return None
    _store(database, target.evaluation_id, outcome)
    reporter.flush()
    return outcome.metrics
