"""vLLM's `/classify` shapes: `{model, input}` in, `data[{index, label, probs, num_classes}]` and usage out."""

import time
import uuid

from pydantic import BaseModel, ConfigDict, Field

from app.errors import APIError
from app.protocols.failures import failure_of
from core.enums import CheckpointTask
from model.tokenizer import TokenizerError
from serving.client import EngineClient, PromptTooLarge, PromptTooLong

MAX_INPUTS = 256


class ClassifyRequest(BaseModel):
    inputs: str | list[str] = Field(alias="input")
    deployment: str | None = Field(None, alias="model", description="default: the default deployment")
    truncate: bool = Field(False, description="cut texts longer than the context instead of refusing them")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


async def classify(engines: EngineClient, body: ClassifyRequest) -> dict:
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not texts or len(texts) > MAX_INPUTS or any(not t for t in texts):
        raise APIError(422, f"input must be 1 to {MAX_INPUTS} non-empty texts", param="input")
    try:
        model = engines.serving(body.deployment, CheckpointTask.CLASSIFIER)
        result = await engines.classify(model, texts, body.truncate)
    except PromptTooLong as e:
        raise APIError(422, f"input {e.input_index} holds {e.n_tokens} tokens; this classifier's context is "
                            f"{e.context_length} (pass truncate: true to cut it)", param="input") from None
    except Exception as e:
        failure = failure_of(e)
        if failure is None:
            raise
        raise APIError(failure.status or 422, failure.message,
                       param="input" if isinstance(e, PromptTooLarge | TokenizerError) else "model") from None
    labels = result.label_names
    return {"id": f"classify-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": model.name, "data": [
                {"index": i, "label": labels[int(row.argmax())], "probs": [float(p) for p in row],
                 "num_classes": len(labels), "probabilities": dict(zip(labels, map(float, row), strict=True))}
                for i, row in enumerate(result.probabilities)],
            "usage": {"prompt_tokens": result.n_tokens, "total_tokens": result.n_tokens}}
