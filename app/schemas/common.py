from enum import StrEnum
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from serving.client import MAX_STOP_CHARS

T = TypeVar("T")
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]  # a stop string, in either protocol


def one_of(*values: str | StrEnum) -> Any:
    """A Literal of the values (an enumeration's members, or a few of them): the schema lists the values
    inline and a bad one is refused by naming them."""
    return Literal[tuple(str(v) for v in values)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Page(BaseModel, Generic[T]):  # noqa: UP046  (Python 3.11 has no type parameter syntax)
    """A page of a list, newest first; pass the last id as `after` for the next page."""

    object: str = "list"
    data: list[T]
    has_more: bool


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True
