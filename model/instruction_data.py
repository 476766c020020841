"""Instruction finetuning data (the book's chapter 7): Alpaca records, the Alpaca prompt template, and
the book's collate function that pads, shifts and masks a batch."""

import codecs
from collections.abc import Iterator
from pathlib import Path

import ijson
import torch
from torch import Tensor

from model.classification_data import DataFormatError, jsonl_values, utf8_lines
from model.tokenizer import Tokenizer

PREAMBLE = ("Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request.")
PROMPT_FORMAT = "alpaca"  # the name a checkpoint trained on these prompts records as its prompt format
NEXT_SECTION = "\n\n###"  # where a generated response ends: the model goes on to another section
MAX_DEPTH = 16  # a record is an object of strings: anything nested deeper is refused before it is built


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


def _first_byte(path: Path) -> bytes:
    """The file's first byte that is not whitespace or a byte-order mark; b"" when there is none."""
    with open(path, "rb") as f:
        if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            f.seek(0)
        while chunk := f.read(1 << 16):
            if stripped := chunk.lstrip():
                return stripped[:1]
    return b""


def _json_list_values(path: Path) -> Iterator[tuple[int, object]]:
    """(record number, value) of each element of a file holding one JSON list, parsed one element at a
    time; DataFormatError names the record where the JSON breaks or nests deeper than MAX_DEPTH."""
    number = 0
    with open(path, "rb") as f:
        if f.read(len(codecs.BOM_UTF8)) != codecs.BOM_UTF8:
            f.seek(0)
        events = ijson.basic_parse(f, use_float=True)
        try:
            if next(events, ("", None))[0] != "start_array":
                raise DataFormatError(path, "expected a JSON list of records")
            depth, builder = 0, ijson.ObjectBuilder()
            for event, value in events:
                if depth == 0 and event == "end_array":
                    continue  # the list's own end: the parser raises on anything after it
                builder.event(event, value)
                depth += (event in ("start_map", "start_array")) - (event in ("end_map", "end_array"))
                if depth > MAX_DEPTH:
                    raise DataFormatError(path, f"nested too deeply (past {MAX_DEPTH} levels)", number + 1, "record")
                if depth == 0:
                    number += 1
                    yield number, builder.value
                    builder = ijson.ObjectBuilder()
        except ijson.JSONError as e:
            raise DataFormatError(path, f"bad JSON: {_parser_problem(e)}", number + 1, "record") from None


def _parser_problem(error: Exception) -> str:
    """The first line of the parser's message: the lines after it quote the file."""
    message = error.args[0] if error.args else ""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    return str(message).split("\n", 1)[0].strip()


def checked_records(path: str | Path, check) -> Iterator[dict]:
    """check(path, value, number, where) of each value of a JSON list or a JSONL file (told apart by the first
    character: "[" opens a list), read one value at a time; where is "record" (JSON list) or "line" (JSONL),
    for the DataFormatError check raises."""
    path = Path(path)
    if _first_byte(path) == b"[":
        values, where = _json_list_values(path), "record"
    else:
        values, where = jsonl_values(path, utf8_lines(path)), "line"
    for number, record in values:
        yield check(path, record, number, where)


def all_records(records: Iterator[dict], path: str | Path) -> list[dict]:
    """The records, read whole; DataFormatError when there are none."""
    records = list(records)
    if not records:
        raise DataFormatError(path, "no records")
    return records


def iter_instruction_file(path: str | Path) -> Iterator[dict]:
    """The Alpaca records {instruction, input, output} of a JSON list or a JSONL file, read one record at a
    time. "input" may be missing and defaults to ""; other fields are kept. Problems raise DataFormatError
    naming the record (JSON list) or the line (JSONL)."""
    return checked_records(path, _check_record)


def read_instruction_file(path: str | Path) -> list[dict]:
    """All of iter_instruction_file's records; DataFormatError when there are none."""
    return all_records(iter_instruction_file(path), path)


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
