"""Checking an evaluation request against its checkpoint and corpus before its job is queued."""

from sqlalchemy.orm import Session

from app.errors import APIError
from app.job_plans import found_or_422
from app.models import Checkpoint, Corpus, Evaluation, Job, JobEvent
from app.schemas.evaluations import EvaluationCreate
from model.evaluation import JUDGE_PROMPT

DEFAULT_BLOCK_SIZE = 128  # one window size for every checkpoint (each within its context), so scores compare
# the request fields that only one kind of evaluation reads
KINDS_OF_FIELD = {"block_size": ("lm",), "stride": ("lm",), "max_tokens": ("lm",), "max_length": ("classifier",),
                  "max_examples": ("classifier", "instruct"), "worst_examples": ("classifier", "instruct"),
                  "max_new_tokens": ("instruct",), "judge": ("instruct",)}


def evaluation_kind(checkpoint: Checkpoint, corpus: Corpus) -> str:
    """lm (a language model on text), classifier, or instruct (an instruction model on instructions)."""
    if checkpoint.task == "classifier":
        if corpus.kind != "classification":
            raise APIError(422, f"checkpoint {checkpoint.id} is a classifier: it is evaluated on a classification "
                                f"corpus, and corpus {corpus.id} is a {corpus.kind} corpus", param="corpus_id")
        unknown = sorted(set(corpus.label_names or []) - set(checkpoint.label_names or []))
        if unknown:
            raise APIError(422, f"corpus {corpus.id} has labels {unknown} that classifier {checkpoint.id} does not "
                                f"know (its classes are {checkpoint.label_names})", param="corpus_id")
        return "classifier"
    if corpus.kind == "text":
        return "lm"
    if corpus.kind == "instruction":
        if checkpoint.prompt_format != "alpaca":
            raise APIError(422, f"checkpoint {checkpoint.id} was not instruction-finetuned (it has no prompt "
                                f"format): evaluate it on a text corpus", param="corpus_id")
        return "instruct"
    raise APIError(422, f"checkpoint {checkpoint.id} is a language model and corpus {corpus.id} is a classification "
                        f"corpus: classification corpora evaluate classifier checkpoints", param="corpus_id")


def _settings(request: EvaluationCreate, kind: str, context_length: int) -> dict:
    """What the numbers depend on, with the defaults filled in."""
    if kind == "lm":
        block_size = request.block_size or min(DEFAULT_BLOCK_SIZE, context_length)
        if block_size > context_length:
            raise APIError(422, f"block_size {block_size} exceeds the checkpoint's context length {context_length}",
                           param="block_size")
        stride = request.stride or max(1, block_size // 2)
        if stride > block_size:
            raise APIError(422, f"stride {stride} exceeds block_size {block_size}: tokens would go unscored",
                           param="stride")
        return {"block_size": block_size, "stride": stride, "max_tokens": request.max_tokens,
                "batch_size": request.batch_size}
    common = {"max_examples": request.max_examples, "worst_examples": request.worst_examples,
              "batch_size": request.batch_size}
    if kind == "classifier":
        max_length = request.max_length or context_length
        if max_length > context_length:
            raise APIError(422, f"max_length {max_length} exceeds the checkpoint's context length {context_length}",
                           param="max_length")
        return {**common, "max_length": max_length}
    judge = request.judge and {"url": str(request.judge.url), "model": request.judge.model,
                               "timeout_s": request.judge.timeout_s, "prompt": JUDGE_PROMPT}
    return {**common, "max_new_tokens": request.max_new_tokens, "judge": judge}


def create_evaluation(session: Session, request: EvaluationCreate) -> Evaluation:
    """A queued evaluate Job and its Evaluation row for a request that holds up; APIError names what does not."""
    checkpoint = found_or_422(session, Checkpoint, request.checkpoint_id, "checkpoint", "checkpoint_id")
    corpus = found_or_422(session, Corpus, request.corpus_id, "corpus", "corpus_id")
    kind = evaluation_kind(checkpoint, corpus)
    for field in sorted(request.model_fields_set & KINDS_OF_FIELD.keys()):
        if kind not in KINDS_OF_FIELD[field]:
            raise APIError(422, f"{field} applies to {' and '.join(KINDS_OF_FIELD[field])} evaluations, and checkpoint "
                                f"{checkpoint.id} on corpus {corpus.id} makes a {kind!r} one", param=field)
    settings = _settings(request, kind, checkpoint.model_config["context_length"])
    job = Job(type="evaluate", corpus_id=corpus.id, spec=request.model_dump(mode="json"), seed=0, total_steps=0)
    session.add(job)
    session.flush()
    evaluation = Evaluation(job_id=job.id, checkpoint_id=checkpoint.id, corpus_id=corpus.id, kind=kind,
                            settings=settings)
    session.add(evaluation)
    session.add(JobEvent(job_id=job.id, type="status", message=f"{kind} evaluation of checkpoint {checkpoint.id} on "
                                                              f"corpus {corpus.id} queued", data={"status": "queued"}))
    session.flush()
    return evaluation
