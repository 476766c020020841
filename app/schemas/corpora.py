from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict

CorpusKind = Literal["text", "classification", "instruction"]


class CorpusOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    object: Literal["corpus"] = "corpus"
    name: str
    kind: CorpusKind
    filename: str
    format: str
    size_bytes: int
    sha256: str
    n_records: int
    n_tokens: int | None
    label_names: list[str] | None
    created_at: datetime
