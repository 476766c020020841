"""Instruction finetuning data (the book's chapter 7): Alpaca records, the Alpaca prompt template, and
the book's collate function that pads, shifts and masks a batch."""

import json
from pathlib import Path

import torch
from torch import Tensor

from model.classification_data import DataFormatError, jsonl_values, read_utf8
from model.json_text import parse_json
from model.tokenizer import Tokenizer

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
PROMPT_FORMAT = "alpaca"  # the name a checkpoint trained on these prompts records as its prompt format
NEXT_SECTION = "\n\n###"  # where a generated response ends: the model goes on to another section


def _check_record(path: Path, record, number: int, where: str) -> dict:
    """The record with "input" defaulted to "", or a DataFormatError naming its record or line."""
    if not isinstance(record, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(record).__name__}", number, where)
    record = {"input": "", **record}
    for field in ("instruction", "input", "output"):
        if field not in record:
            raise DataFormatError(path, f"missing field {field!r}", number, where)
        if not isinstance(record[field], str):
            raise DataFormatError(path, f"{field!r} must be a string, got {type(record[field]).__name__}",
                                  number, where)
    if not record["instruction"].strip():
        raise DataFormatError(path, "empty instruction", number, where)
    return record


def _json_records(path: Path, text: str) -> list[dict]:
    try:
        records = parse_json(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"bad JSON: {e.msg} (column {e.colno})", e.lineno) from None
    if not isinstance(records, list):
        raise DataFormatError(path, f"expected a JSON list of records, got {type(records).__name__}")
    return [_check_record(path, r, i, "record") for i, r in enumerate(records, start=1)]


def _jsonl_records(path: Path, text: str) -> list[dict]:
    return [_check_record(path, record, line, "line") for line, record in jsonl_values(path, text)]


def read_instruction_file(path: str | Path) -> list[dict]:
    """Alpaca records {instruction, input, output} from a JSON list or a JSONL file (told apart by the
    first character: "[" opens a list). "input" may be missing and defaults to ""; other fields are kept.
    Problems raise DataFormatError naming the record (JSON list) or the line (JSONL)."""
    path = Path(path)
    text = read_utf8(path)
    records = _json_records(path, text) if text.lstrip().startswith("[") else _jsonl_records(path, text)
    if not records:
        raise DataFormatError(path, "no records")
    return records


def format_prompt(record: dict) -> str:
    """The book's format_input: the Alpaca preamble, the instruction, and the input when there is one."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{record['instruction']}"
    if record.get("input"):
        text += f"\n\n### Input:\n{record['input']}"
    return text


def format_response(record: dict) -> str:
    return f"\n\n### Response:\n{record['output']}"


def format_chat(messages: list[tuple[str, str]]) -> str:
    """The Alpaca prompt of a conversation of (role, content) pairs, roles system, user and assistant:
    system messages first, earlier turns as answered instructions, the last user message as the
    instruction to answer now."""
    system = "".join(content + "\n\n" for role, content in messages if role == "system")
    turns, pending = [], None
    for role, content in messages:
        if role == "user":
            pending = content
        elif role == "assistant" and pending is not None:
            turns.append(format_prompt({"instruction": pending}) + format_response({"output": content}) + "\n\n")
            pending = None
    return system + "".join(turns) + format_prompt({"instruction": pending}) + format_response({"output": ""})


def encode_instruction(record: dict, tokenizer: Tokenizer) -> tuple[list[int], int]:
    """(ids of prompt + response, number of those ids that are the prompt), for instruction_collate.

    Like the book, the whole text is encoded at once and the prompt's length is that of the prompt
    encoded alone; special-token text is encoded as plain text."""
    prompt = format_prompt(record)
    ids = tokenizer.encode(prompt + format_response(record), allow_special=False)
    return ids, len(tokenizer.encode(prompt, allow_special=False))


def instruction_collate(batch: list[tuple[list[int], int]], pad_id: int = 50256, ignore_index: int = -100,
                        max_length: int | None = None, mask_prompt: bool = False) -> tuple[Tensor, Tensor]:
    """The book's custom_collate_fn on (ids, prompt length) pairs: inputs, targets LongTensors [B, T].

    Each sequence gets one pad_id as its end-of-text token and is padded with pad_id to the longest;
    inputs are seq[:-1], targets seq[1:]. Targets past the end-of-text token become ignore_index, so the
    model learns to stop but not to predict padding; with mask_prompt, so do the targets that are prompt
    tokens. Then both are cut to max_length. The padding is found by position, not by value as in the
    book, so a text that itself contains pad_id keeps that target."""
    width = max(len(ids) for ids, _ in batch) + 1  # T + 1: room for the end-of-text token
    inputs = torch.full((len(batch), width - 1), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((len(batch), width - 1), ignore_index, dtype=torch.long)  # [B, T]
    for row, (ids, prompt_length) in enumerate(batch):
        n = len(ids)
        if n == 0:
            raise ValueError(f"sequence {row} of the batch has no tokens")
        inputs[row, :n] = torch.tensor(ids, dtype=torch.long)
        targets[row, : n - 1] = inputs[row, 1:n]
        targets[row, n - 1] = pad_id  # after the last real token comes end of text
        if mask_prompt:
            targets[row, : max(prompt_length - 1, 0)] = ignore_index  # target i is token i + 1
    return inputs[:, :max_length], targets[:, :max_length]
