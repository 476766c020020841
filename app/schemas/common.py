from typing import Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class Page(BaseModel, Generic[T]):  # noqa: UP046  (Python 3.11 has no type parameter syntax)
    """A page of a list, newest first; pass the last id as `after` for the next page."""

    object: str = "list"
    data: list[T]
    has_more: bool


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True
