"""How a serving failure is answered: one status per failure, whatever the protocol. Each protocol words
its own body (TGI's `{error, error_type}`, OpenAI's `{"error": {...}}`) and its own validation status."""

from typing import NamedTuple

from pydantic import ValidationError

from model.tokenizer import TokenizerError
from serving.client import GenerationFailed, InvalidRequest, Overloaded, PromptTooLarge
from serving.deployments import NotServing


class Failure(NamedTuple):
    status: int | None  # None: the protocol's status for a request it refuses (TGI 422, OpenAI 400)
    kind: str  # not_found, unavailable, validation, overloaded or generation
    message: str


NOT_SERVING = {NotServing.Reason.MISSING: (404, "not_found"), NotServing.Reason.NO_DEFAULT: (503, "unavailable"),
               NotServing.Reason.LOADING: (503, "unavailable"), NotServing.Reason.WRONG_TASK: (None, "validation"),
               NotServing.Reason.AMBIGUOUS: (None, "validation")}


def first_problem(error: ValidationError) -> tuple[str | None, str]:
    """(the field, the message) of a request body's first validation error, as both protocols word it."""
    first = error.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    return param, f"{param}: {first['msg']}" if param else first["msg"]


def failure_of(error: Exception) -> Failure | None:
    """The answer to a serving error, or None for an exception that is not one."""
    if isinstance(error, NotServing):
        return Failure(*NOT_SERVING[error.reason], error.message)
    if isinstance(error, Overloaded):
        return Failure(429, "overloaded", f"the model is overloaded: {error}")
    if isinstance(error, GenerationFailed):
        return Failure(424, "generation", str(error))
    if isinstance(error, PromptTooLarge):
        return Failure(413, "validation", str(error))
    if isinstance(error, InvalidRequest | TokenizerError):  # TokenizerError: an imported tokenizer's, on this text
        return Failure(None, "validation", str(error))
    return None
