"""JSON from outside (request bodies, uploaded files): json.loads, but a document nested past the interpreter's
recursion limit is malformed JSON like any other, not a RecursionError."""

import json
from typing import Any


def parse_json(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text if isinstance(text, str) else "", 0) from None
