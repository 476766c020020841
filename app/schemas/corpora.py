from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

from app.schemas.common import one_of
from core.enums import CorpusKind

CorpusKindName = one_of(*CorpusKind)


class CorpusOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["corpus"] = "corpus"
    name: str
    kind: CorpusKindName
    filename: str
    format: str
    size_bytes: int
    sha256: str
    n_records: int
    n_tokens: int | None
    label_names: list[str] | None
    created_at: datetime
