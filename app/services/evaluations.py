"""Evaluations: checking a request against its checkpoint and corpus before its job is queued, and
comparing the numbers of several."""

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from app.schemas.evaluations import ComparisonRow, EvaluationCreate
from app.services.jobs import named_row
from core import jobs
from core.enums import CheckpointTask, CorpusKind, EvaluationKind
from core.errors import Invalid, NotFound
from core.outbound import RefusedURL, destination
from core.sealing import seal
from core.settings import Settings
from core.tables import Checkpoint, Corpus, Evaluation, Job
from model import PROMPT_FORMAT
from model.evaluation import HIGHER_IS_BETTER, JUDGE_PROMPT, LOWER_IS_BETTER

DEFAULT_BLOCK_SIZE = 128  # one window size for every checkpoint (each within its context), so scores compare
MAX_COMPARED = 100
LM, CLASSIFIER, INSTRUCT, PREFERENCE = EvaluationKind
# the request fields that only one kind of evaluation reads
KINDS_OF_FIELD = {"block_size": (LM,), "stride": (LM,), "max_tokens": (LM,), "max_length": (CLASSIFIER, PREFERENCE),
                  "max_examples": (CLASSIFIER, INSTRUCT, PREFERENCE),
                  "worst_examples": (CLASSIFIER, INSTRUCT, PREFERENCE),
                  "max_new_tokens": (INSTRUCT,), "judge": (INSTRUCT,)}


def evaluation_kind(checkpoint: Checkpoint, corpus: Corpus) -> EvaluationKind:
    if checkpoint.task == CheckpointTask.CLASSIFIER:
        if corpus.kind != CorpusKind.CLASSIFICATION:
            raise Invalid(f"checkpoint {checkpoint.id} is a classifier: it is evaluated on a classification "
                          f"corpus, and corpus {corpus.id} is a {corpus.kind} corpus", param="corpus_id")
        unknown = sorted(set(corpus.label_names or []) - set(checkpoint.label_names or []))
        if unknown:
            raise Invalid(f"corpus {corpus.id} has labels {unknown} that classifier {checkpoint.id} does not "
                          f"know (its classes are {checkpoint.label_names})", param="corpus_id")
        return CLASSIFIER
    if corpus.kind == CorpusKind.TEXT:
        return LM
    if corpus.kind == CorpusKind.INSTRUCTION:
        if checkpoint.prompt_format != PROMPT_FORMAT:
            raise Invalid(f"checkpoint {checkpoint.id} was not instruction-finetuned (it has no prompt "
                          f"format): evaluate it on a text corpus", param="corpus_id")
        return INSTRUCT
    if corpus.kind == CorpusKind.PREFERENCE:
        return PREFERENCE
    raise Invalid(f"checkpoint {checkpoint.id} is a language model and corpus {corpus.id} is a classification "
                  f"corpus: classification corpora evaluate classifier checkpoints", param="corpus_id")


def _settings(request: EvaluationCreate, kind: str, context_length: int) -> dict:
    """What the numbers depend on, with the defaults filled in."""
    if kind == LM:
        block_size = request.block_size or min(DEFAULT_BLOCK_SIZE, context_length)
        if block_size > context_length:
            raise Invalid(f"block_size {block_size} exceeds the checkpoint's context length {context_length}",
                          param="block_size")
        stride = request.stride or max(1, block_size // 2)
        if stride > block_size:
            raise Invalid(f"stride {stride} exceeds block_size {block_size}: tokens would go unscored",
                          param="stride")
        return {"block_size": block_size, "stride": stride, "max_tokens": request.max_tokens,
                "batch_size": request.batch_size}
    common = {"max_examples": request.max_examples, "worst_examples": request.worst_examples,
              "batch_size": request.batch_size}
    if kind in (CLASSIFIER, PREFERENCE):
        max_length = request.max_length or context_length
        if max_length > context_length:
            raise Invalid(f"max_length {max_length} exceeds the checkpoint's context length {context_length}",
                          param="max_length")
        return {**common, "max_length": max_length}
    judge = request.judge and {"url": str(request.judge.url), "model": request.judge.model,
                               "timeout_s": request.judge.timeout_s, "prompt": JUDGE_PROMPT}
    return {**common, "max_new_tokens": request.max_new_tokens, "judge": judge}


def _job_spec(request: EvaluationCreate, service_settings: Settings) -> dict:
    """The request as its job keeps it: a judge's URL checked (and again by the worker before it connects: DNS
    answers change), its API key encrypted."""
    spec = request.model_dump(mode="json")
    judge = spec["judge"]
    if judge is None:
        return spec
    try:
        destination(judge["url"], service_settings.judge_allowed_hosts)
    except RefusedURL as e:
        raise Invalid(f"the judge's URL is refused: {e}", param="judge.url") from e
    if judge["api_key"] is not None:
        judge["api_key"] = seal(service_settings, judge["api_key"])
    return spec


def create_evaluation(session: Session, service_settings: Settings, request: EvaluationCreate) -> Evaluation:
    """A queued evaluate Job and its Evaluation row for a request that holds up; Invalid names what does not."""
    checkpoint = named_row(session, Checkpoint, request.checkpoint_id, "checkpoint", "checkpoint_id")
    corpus = named_row(session, Corpus, request.corpus_id, "corpus", "corpus_id")
    kind = evaluation_kind(checkpoint, corpus)
    for field in sorted(request.model_fields_set & KINDS_OF_FIELD.keys()):
        if kind not in KINDS_OF_FIELD[field]:
            raise Invalid(f"{field} applies to {' and '.join(KINDS_OF_FIELD[field])} evaluations, and checkpoint "
                          f"{checkpoint.id} on corpus {corpus.id} makes a {kind.value!r} one", param=field)
    settings = _settings(request, kind, checkpoint.model_config["context_length"])
    spec = _job_spec(request, service_settings)
    job = jobs.create(session, f"{kind} evaluation of checkpoint {checkpoint.id} on corpus {corpus.id} queued",
                      type=jobs.JobType.EVALUATE, corpus_id=corpus.id, spec=spec, seed=0, total_steps=0)
    evaluation = Evaluation(job_id=job.id, checkpoint_id=checkpoint.id, corpus_id=corpus.id, kind=kind,
                            settings=settings)
    session.add(evaluation)
    session.flush()
    return evaluation


def compared(session: Session, ids: str | None, corpus_id: str | None) -> list[Evaluation]:
    """The evaluations named by ids (comma-separated), or the newest finished ones on corpus_id, oldest first."""
    if (ids is None) == (corpus_id is None):
        raise Invalid("pass either ids (comma-separated evaluation ids) or corpus_id", param="ids")
    statement = select(Evaluation).options(selectinload(Evaluation.job))
    if corpus_id is not None:
        newest = list(session.scalars(statement.join(Evaluation.job).where(
            Evaluation.corpus_id == corpus_id, Job.status == jobs.JobStatus.SUCCEEDED)
            .order_by(Evaluation.id.desc()).limit(MAX_COMPARED)))
        if not newest:
            raise NotFound(f"no finished evaluation on corpus {corpus_id}", param="corpus_id")
        return newest[::-1]
    wanted = list(dict.fromkeys(part.strip() for part in ids.split(",") if part.strip()))
    if not wanted or len(wanted) > MAX_COMPARED:
        raise Invalid(f"ids must name between 1 and {MAX_COMPARED} evaluations", param="ids")
    found = {e.id: e for e in session.scalars(statement.where(Evaluation.id.in_(wanted)))}
    missing = [i for i in wanted if i not in found]
    if missing:
        raise NotFound(f"no evaluation with id(s) {', '.join(missing)}", param="ids")
    return [found[i] for i in wanted]


def best_of(rows: list[ComparisonRow]) -> dict[str, str]:
    """Each ranking metric's best evaluation id among the rows that have it."""
    best = {}
    for name in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER):
        scored = [(row.metrics[name], row.evaluation_id) for row in rows
                  if row.metrics and row.metrics.get(name) is not None]
        if scored:
            pick = max if name in HIGHER_IS_BETTER else min
            best[name] = pick(scored, key=lambda pair: pair[0])[1]
    return best


def differences(rows: list[ComparisonRow]) -> list[str]:
    """What keeps the rows' numbers from measuring the same thing."""
    notes = []
    for field in ("corpus_id", "kind"):
        values = sorted({getattr(row, field) for row in rows})
        if len(values) > 1:
            notes.append(f"the rows differ in {field}: {', '.join(values)}")
    for name in sorted({name for row in rows for name in row.settings}):
        values = {repr(row.settings.get(name)) for row in rows}
        if len(values) > 1:
            notes.append(f"the rows differ in the setting {name}: {', '.join(sorted(values))}")
    unfinished = [row.evaluation_id for row in rows if row.metrics is None]
    if unfinished:
        notes.append(f"no numbers yet (not succeeded): {', '.join(unfinished)}")
    return notes
