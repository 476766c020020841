"""Classification with a deployed classifier checkpoint, in the shape of vLLM's `/classify`."""

import time
import uuid

import torch
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from app.auth import Reader
from app.errors import APIError
from app.serving import NotServing
from model import encode_classification

router = APIRouter(tags=["classification"], dependencies=[Reader])
MAX_INPUTS = 256


class ClassifyRequest(BaseModel):
    inputs: str | list[str] = Field(alias="input")
    deployment: str | None = Field(None, alias="model", description="default: the default deployment")
    truncate: bool = Field(False, description="cut texts longer than the context instead of refusing them")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _classifier(request: Request, name: str | None):
    try:
        return request.app.state.deployments.serving(name, "classifier")
    except NotServing as e:
        status = {"missing": 404 if name else 503, "loading": 503, "wrong_task": 422}[e.reason]
        raise APIError(status, e.message, param="model") from None


@router.post("/classify")
async def classify(request: Request, body: ClassifyRequest) -> dict:
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not texts or len(texts) > MAX_INPUTS or any(not t for t in texts):
        raise APIError(422, f"input must be 1 to {MAX_INPUTS} non-empty texts", param="input")
    served = _classifier(request, body.deployment)
    loaded = served.current
    context = loaded.model.config.context_length
    encoded = [loaded.tokenizer.encode(t, allow_special=False) for t in texts]
    too_long = [i for i, ids in enumerate(encoded) if len(ids) > context]
    if too_long and not body.truncate:
        raise APIError(422, f"input {too_long[0]} holds {len(encoded[too_long[0]])} tokens; this classifier's "
                            f"context is {context} (pass truncate: true to cut it)", param="input")

    def run() -> torch.Tensor:  # one batch, off the event loop
        ids, lengths = encode_classification(texts, loaded.tokenizer, max_length=context,
                                            pad_id=loaded.tokenizer.eot_id)
        ids = ids[:, : int(lengths.max())]
        return loaded.model.predict_proba(ids, lengths)

    probs = await run_in_threadpool(run)
    labels = loaded.meta["label_names"]
    n_tokens = sum(min(len(ids), context) for ids in encoded)
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": served.name, "data": [
                {"index": i, "label": labels[int(row.argmax())], "probs": [float(p) for p in row],
                 "num_classes": len(labels), "probabilities": dict(zip(labels, map(float, row), strict=True))}
                for i, row in enumerate(probs)],
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}
