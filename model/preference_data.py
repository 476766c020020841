"""Preference data for DPO (the book's chapter-7 bonus): prompts with a chosen and a rejected response.

A corpus is a JSON list or a JSONL file (as instruction corpora are, model.instruction_data) of records in
one of two forms:
- {"instruction", "input" (optional), "chosen", "rejected"}: the book's form; the prompt is the Alpaca
  prompt of the instruction and input, up to "### Response:\\n", as an instruction model is trained on;
- {"prompt", "chosen", "rejected"}: a prompt used as it is.
Chosen and rejected are non-empty strings that differ; other fields are kept.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from model.classification_data import DataFormatError
from model.instruction_data import all_records, checked_records, format_prompt, format_response
from model.tokenizer import Tokenizer

RESPONSES = ("chosen", "rejected")


class PreferencePair(NamedTuple):
    """Token ids of one record: the chosen and rejected responses each end with end-of-text unless cut."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]


def _string(path: Path, record: dict, field: str, number: int, where: str) -> str:
    if field not in record:
        raise DataFormatError(path, f"missing field {field!r}", number, where)
    if not isinstance(record[field], str):
        raise DataFormatError(path, f"{field!r} must be a string, got {type(record[field]).__name__}", number, where)
    if not record[field].strip():
        raise DataFormatError(path, f"empty {field!r}", number, where)
    return record[field]


def _check_record(path: Path, record, number: int, where: str) -> dict:
    """The record (an Alpaca one with "input" defaulted to ""), or a DataFormatError naming its record or
    line and the field."""
    if not isinstance(record, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(record).__name__}", number, where)
    if "prompt" in record and "instruction" in record:
        raise DataFormatError(path, "both 'prompt' and 'instruction': a record has one or the other", number, where)
    if "prompt" in record:
        _string(path, record, "prompt", number, where)
    else:
        if "instruction" not in record:
            raise DataFormatError(path, "missing field 'instruction' (or 'prompt')", number, where)
        _string(path, record, "instruction", number, where)
        record = {"input": "", **record}
        if not isinstance(record["input"], str):
            raise DataFormatError(path, f"'input' must be a string, got {type(record['input']).__name__}",
                                  number, where)
    chosen, rejected = (_string(path, record, field, number, where) for field in RESPONSES)
    if chosen.strip() == rejected.strip():
        raise DataFormatError(path, "'chosen' and 'rejected' are the same text", number, where)
    return record


def iter_preference_file(path: str | Path) -> Iterator[dict]:
    """The checked records of a JSON list or JSONL file, one at a time (an upload check counts them);
    problems raise DataFormatError naming the record (JSON list) or line (JSONL) and the field."""
    return checked_records(path, _check_record)


def read_preference_file(path: str | Path) -> list[dict]:
    """All of iter_preference_file's records; DataFormatError when there are none."""
    return all_records(iter_preference_file(path), path)


def preference_prompt(record: dict) -> str:
    """The text both responses follow: a raw prompt, or the Alpaca prompt an instruction model answers."""
    if "prompt" in record:
        return record["prompt"]
    return format_prompt(record) + format_response({"output": ""})


def encode_preference(record: dict, tokenizer: Tokenizer, max_length: int | None = None) -> PreferencePair:
    """The record's prompt and responses as token ids, each response followed by end-of-text as
    instruction finetuning teaches a model to end (instruction_collate's one pad_id target).

    Prompt and responses are encoded apart, as a served model sees its prompt encoded and then generates;
    for the Alpaca prompt, which ends in a newline, that gives encode_instruction's ids. Special-token text
    is encoded as plain text. With max_length, the positions a model reads (its context), each sequence
    prompt + response keeps at most max_length + 1 tokens (the last is only a target): the prompt whole
    and the responses cut, a cut response losing its end-of-text. A prompt longer than max_length keeps
    its last max_length tokens, what the responses follow, so that each response keeps its first token."""
    prompt = tokenizer.encode(preference_prompt(record), allow_special=False)
    chosen, rejected = (tokenizer.encode(record[field], allow_special=False) + [tokenizer.eot_id]
                        for field in RESPONSES)
    if max_length is None:
        return PreferencePair(prompt, chosen, rejected)
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    prompt = prompt[-max_length:]
    room = max_length + 1 - len(prompt)
    return PreferencePair(prompt, chosen[:room], rejected[:room])


def response_batch(sequences: list[tuple[list[int], list[int]]], pad_id: int,
                   ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Inputs and targets LongTensors [N, T] of (prompt, response) ids, right-padded with pad_id, T the
    longest prompt + response less one. Target i is token i + 1 where that is a response token and
    ignore_index elsewhere (the prompt and the padding), so a response's log-probability is the sum over
    its targets."""
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    inputs = torch.full((len(sequences), width - 1), pad_id, dtype=torch.long)  # [N, T]
    targets = torch.full((len(sequences), width - 1), ignore_index, dtype=torch.long)  # [N, T]
    for row, (prompt, response) in enumerate(sequences):
        if not prompt or not response:
            raise ValueError(f"sequence {row} needs at least one prompt and one response token")
        ids = torch.tensor(prompt + response, dtype=torch.long)
        inputs[row, : len(ids) - 1] = ids[:-1]
        targets[row, len(prompt) - 1: len(ids) - 1] = ids[len(prompt):]
    return inputs, targets
