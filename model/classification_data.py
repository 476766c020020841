"""Classification finetuning data (the book's chapter 6): labelled texts from CSV, TSV or JSONL files,
class balancing, seeded splits, and right-padded token batches for GPTClassifier.

Formats, chosen by the file's extension:
- .csv: a header row naming the text and label columns; standard CSV quoting, so a quoted field may
  span lines;
- .tsv (or no extension, as UCI ships SMSSpamCollection): either a header row naming both columns, or
  headerless `label<TAB>text` rows. TSV is read without quote handling: quotes are part of the text,
  which keeps all 5574 SMSSpamCollection rows (pandas' default quote parsing reads 5572);
- .jsonl: one object per line with the text and label fields.
"""

import csv
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from model.json_text import parse_json
from model.tokenizer import Tokenizer

MAX_LABELS = 1024  # a classifier's head has one output per label


class DataFormatError(ValueError):
    """A data file that cannot be read as intended; the message names the file and, where there is one,
    the 1-based line (or record) of the problem."""

    def __init__(self, path: str | Path, problem: str, line: int | None = None, where: str = "line"):
        self.path, self.problem, self.line, self.where = Path(path), problem, line, where
        place = f"{path}: {where} {line}: " if line is not None else f"{path}: "
        super().__init__(place + problem)

    def __reduce__(self):  # pickled across processes (workers) with all its arguments, not just the message
        return type(self), (self.path, self.problem, self.line, self.where)


def utf8_lines(path: str | Path) -> Iterator[str]:
    """The lines of a UTF-8 file one at a time, each with its line ending (a leading byte-order mark
    dropped), or a DataFormatError naming the line of the first byte that is not UTF-8. Lines end at \\n
    only: form feeds and U+2028 belong to the text."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                yield raw.decode("utf-8-sig" if line == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})",
                                      line) from None


@dataclass
class ClassificationData:
    texts: list[str]
    labels: list[int]  # indices into label_names
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows) -> "ClassificationData":
        return ClassificationData([self.texts[i] for i in rows], [self.labels[i] for i in rows],
                                  list(self.label_names))


def _csv_rows(path: Path, lines: Iterable[str], delimiter: str, quoting: int,
              text_field: str, label_field: str) -> Iterator[tuple[int, str, str]]:
    """(line, text, label) of each data row of a delimited file with a header."""
    reader = csv.reader(lines, delimiter=delimiter, quoting=quoting, strict=True)
    try:
        header = next(reader, [])
        columns = {name.strip(): i for i, name in enumerate(header)}
        for field in (text_field, label_field):
            if field not in columns:
                raise DataFormatError(path, f"no {field!r} column in the header {header}", 1)
        need = max(columns[text_field], columns[label_field]) + 1
        line = reader.line_num + 1
        for row in reader:
            if row:  # blank lines separate nothing
                if len(row) < need:
                    raise DataFormatError(path, f"{len(row)} fields, the header has {len(header)}", line)
                yield line, row[columns[text_field]], row[columns[label_field]]
            line = reader.line_num + 1
    except csv.Error as e:
        raise DataFormatError(path, f"bad CSV: {e}", reader.line_num) from None


def _headerless_tsv_rows(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, str, str]]:
    """(line, text, label) of each `label<TAB>text` row, UCI SMSSpamCollection's form."""
    for line, row in enumerate(lines, start=1):
        if row.strip():
            label, tab, body = row.removesuffix("\n").removesuffix("\r").partition("\t")
            if not tab:
                raise DataFormatError(path, "no tab: expected label<TAB>text", line)
            yield line, body, label


def _tsv_rows(path: Path, lines: Iterator[str], text_field: str, label_field: str) -> Iterator[tuple[int, str, str]]:
    first_line = next(lines, "")
    lines = itertools.chain([first_line], lines)
    first = first_line.rstrip("\r\n").split("\t")
    names = {name.strip() for name in first}
    if text_field in names and label_field in names:
        return _csv_rows(path, lines, "\t", csv.QUOTE_NONE, text_field, label_field)
    if len(first) == 2:
        return _headerless_tsv_rows(path, lines)
    raise DataFormatError(path, f"expected a header with {text_field!r} and {label_field!r} columns, or "
                                "label<TAB>text rows", 1)


def jsonl_values(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a JSONL file; DataFormatError names the line
    that is not JSON."""
    for line, row in enumerate(lines, start=1):
        if not row.strip():
            continue
        try:
            yield line, parse_json(row)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"bad JSON: {e.msg} (column {e.colno})", line) from None


def _jsonl_rows(path: Path, lines: Iterable[str], text_field: str, label_field: str) -> Iterator[tuple[int, str, str]]:
    for line, record in jsonl_values(path, lines):
        if not isinstance(record, dict):
            raise DataFormatError(path, f"expected a JSON object, got {type(record).__name__}", line)
        for field in (text_field, label_field):
            if field not in record:
                raise DataFormatError(path, f"missing field {field!r}", line)
        body, label = record[text_field], record[label_field]
        if not isinstance(body, str):
            raise DataFormatError(path, f"{text_field!r} must be a string, got {type(body).__name__}", line)
        if isinstance(label, bool) or not isinstance(label, str | int):
            problem = f"{label_field!r} must be a string or an integer, got {label!r}"
            raise DataFormatError(path, problem, line)
        yield line, body, str(label)


def iter_classification_file(path: str | Path, text_field: str = "text", label_field: str = "label",
                             label_names: list[str] | None = None) -> Iterator[tuple[str, str]]:
    """(text, label name) of each row of a CSV, TSV or JSONL file (see the module docstring), read one
    line at a time. Labels are compared as strings after stripping surrounding whitespace; texts are kept
    as they are but must not be blank. With label_names, every label must be one of them; without, the
    file may hold at most MAX_LABELS distinct labels."""
    path = Path(path)
    lines = utf8_lines(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(path, lines, ",", csv.QUOTE_MINIMAL, text_field, label_field)
    elif suffix in (".tsv", ".tab", ".txt", ""):
        rows = _tsv_rows(path, lines, text_field, label_field)
    elif suffix in (".jsonl", ".ndjson"):
        rows = _jsonl_rows(path, lines, text_field, label_field)
    else:
        raise DataFormatError(path, f"unknown extension {suffix!r}: expected .csv, .tsv or .jsonl")
    seen: set[str] = set()
    for line, body, label in rows:
        if not body.strip():
            raise DataFormatError(path, "empty text", line)
        label = label.strip()
        if not label:
            raise DataFormatError(path, "empty label", line)
        if label_names is not None and label not in label_names:
            raise DataFormatError(path, f"label {label!r} is not one of {label_names}", line)
        if label not in seen:
            if len(seen) == MAX_LABELS:
                raise DataFormatError(path, f"more than {MAX_LABELS} distinct labels", line)
            seen.add(label)
        yield body, label


def label_order(path: str | Path, names: set[str]) -> list[str]:
    """The labels a file's rows hold, as the classifier numbers them: sorted, numerically when all are
    integers so that "2" comes before "10"; DataFormatError when there are fewer than two."""
    if len(names) < 2:
        raise DataFormatError(path, f"a classifier needs at least two labels, found {sorted(names)}")
    if all(re.fullmatch(r"-?[0-9]+", name) for name in names):
        return sorted(names, key=int)
    return sorted(names)


def read_classification_file(path: str | Path, text_field: str = "text", label_field: str = "label",
                             label_names: list[str] | None = None) -> ClassificationData:
    """Texts and integer labels of a CSV, TSV or JSONL file (iter_classification_file's rows): label i is
    label_names[i], or without label_names the i-th of the file's labels in label_order."""
    texts, raw_labels = [], []
    for body, label in iter_classification_file(path, text_field, label_field, label_names):
        texts.append(body)
        raw_labels.append(label)
    names = list(label_names) if label_names is not None else label_order(path, set(raw_labels))
    index = {name: i for i, name in enumerate(names)}
    return ClassificationData(texts, [index[label] for label in raw_labels], names)


def balance_classes(data: ClassificationData, seed: int = 123) -> ClassificationData:
    """Undersample every class to the size of the smallest, like the book's create_balanced_dataset.

    A larger class keeps the rows np.random.RandomState(seed).permutation(count)[:smallest] picks: the
    draw pandas' DataFrame.sample(n, random_state=seed) makes. A class already at the smallest size keeps
    its rows and order, and classes follow one another in label order. The book's ham subset still differs,
    because its pandas read of SMSSpamCollection has two ham rows fewer (quote parsing), so the same draw
    picks from a different list."""
    labels = np.asarray(data.labels)
    per_class = [np.flatnonzero(labels == c) for c in range(len(data.label_names))]
    smallest = min(len(rows) for rows in per_class)
    if smallest == 0:
        raise ValueError("cannot balance: some label has no rows "
                         f"({[data.label_names[c] for c, r in enumerate(per_class) if len(r) == 0]})")
    kept = [rows if len(rows) == smallest
            else rows[np.random.RandomState(seed).permutation(len(rows))[:smallest]]
            for rows in per_class]
    return data.subset(np.concatenate(kept).tolist())


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Rows of each part after a seeded shuffle (pandas' sample(frac=1, random_state=seed) order).

    Every part but the last gets int(n * fraction) rows, the last the rest: the book's 70/10/20 of its
    1494 balanced texts is 1045/149/300."""
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    order = np.random.RandomState(seed).permutation(n)
    ends = np.cumsum([int(n * f) for f in fractions[:-1]])
    return np.split(order, ends)


def split_dataset(data: ClassificationData, fractions: tuple[float, ...] = (0.7, 0.1, 0.2),
                  seed: int = 123) -> list[ClassificationData]:
    """The book's random_split: shuffle, then consecutive parts, e.g. [train, validation, test]."""
    return [data.subset(rows.tolist()) for rows in split_indices(len(data), fractions, seed)]


def encode_classification(texts: list[str], tokenizer: Tokenizer, max_length: int | None = None,
                          pad_id: int = 50256) -> tuple[Tensor, Tensor]:
    """Token ids [N, L] right-padded with pad_id, and lengths [N] of real tokens in each row.

    L is max_length when given (longer texts are cut to it, as the book's SpamDataset does), else the
    longest text. Special-token text is encoded as plain text: data should not inject control tokens.
    The classifier reads position lengths - 1, so every text must keep at least one token."""
    return pad_token_ids(tokenizer.encode_batch(texts, allow_special=False), max_length, pad_id)


def pad_token_ids(encoded: list[list[int]], max_length: int | None = None,
                  pad_id: int = 50256) -> tuple[Tensor, Tensor]:
    """encode_classification for texts already encoded."""
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    encoded = [ids[:max_length] for ids in encoded]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"text {i} encodes to no tokens")
    width = max_length if max_length is not None else max((len(ids) for ids in encoded), default=0)
    out = torch.full((len(encoded), width), pad_id, dtype=torch.long)  # [N, L]
    for row, ids in zip(out, encoded, strict=True):
        row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out, torch.tensor([len(ids) for ids in encoded], dtype=torch.long)
