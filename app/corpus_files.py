"""Checking an uploaded corpus file: readable as its kind, with a clear error naming the first bad line."""

from dataclasses import dataclass
from pathlib import Path

from core.enums import CorpusKind
from model import DataFormatError, gpt2_tokenizer, read_classification_file, read_instruction_file

FORMATS = {CorpusKind.TEXT: ("txt",), CorpusKind.CLASSIFICATION: ("csv", "tsv", "jsonl"),
           CorpusKind.INSTRUCTION: ("json", "jsonl")}
TOKEN_COUNT_LIMIT_BYTES = 64 * 1024 * 1024  # larger text corpora are counted when a job tokenizes them


class CorpusContentError(ValueError):
    """The file is not a valid corpus of its kind; the message names the first problem and its line."""


@dataclass
class CorpusSummary:
    n_records: int
    n_tokens: int | None
    label_names: list[str] | None = None


def format_of(filename: str | None, kind: str, declared: str | None) -> str:
    """The file format: declared, else the uploaded name's extension; one of the kind's formats."""
    allowed = FORMATS[kind]
    fmt = (declared or (Path(filename).suffix.lstrip(".") if filename else "")).lower()
    if not fmt and len(allowed) == 1:
        fmt = allowed[0]
    if fmt not in allowed:
        shown = f"format {fmt!r}" if fmt else "a file without an extension"
        raise CorpusContentError(f"a {kind} corpus must be {' or '.join(allowed)}, got {shown} "
                                 f"(name the file accordingly or pass 'format')")
    return fmt


def _check_text(path: Path) -> CorpusSummary:
    lines, size = 0, path.stat().st_size
    if size == 0:
        raise CorpusContentError("the file is empty")
    tokenizer = gpt2_tokenizer() if size <= TOKEN_COUNT_LIMIT_BYTES else None
    n_tokens = 0
    with open(path, "rb") as f:
        if b"\x00" in f.read(8192):
            raise CorpusContentError("the file holds NUL bytes: it looks like a binary file, not text")
        f.seek(0)
        for number, raw in enumerate(f, start=1):
            if b"\x00" in raw:
                raise CorpusContentError(f"line {number}: a NUL byte: this looks like a binary file, not text")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusContentError(f"line {number}: not UTF-8 (byte {e.start + 1} of the line)") from None
            lines = number
            if tokenizer is not None:
                n_tokens += len(tokenizer.encode(line, allow_special=False))
    return CorpusSummary(n_records=lines, n_tokens=n_tokens if tokenizer is not None else None)


def check_corpus(path: Path, kind: str) -> CorpusSummary:
    """Read the whole file (its suffix is its format) as a corpus of its kind; CorpusContentError names
    the first problem and where it is, never the server-side path."""
    if kind == CorpusKind.TEXT:
        return _check_text(path)
    tokenizer = gpt2_tokenizer()
    try:
        if kind == CorpusKind.CLASSIFICATION:
            data = read_classification_file(path)
            n_tokens = sum(len(t) for t in tokenizer.encode_batch(data.texts, allow_special=False))
            return CorpusSummary(len(data.texts), n_tokens, list(data.label_names))
        records = read_instruction_file(path)
    except DataFormatError as e:
        place = f"{e.where} {e.line}: " if e.line is not None else ""
        raise CorpusContentError(place + e.problem) from None
    if not records:
        raise CorpusContentError("the file holds no instruction records")
    texts = [r["instruction"] + r["input"] + r["output"] for r in records]
    return CorpusSummary(len(records), sum(len(t) for t in tokenizer.encode_batch(texts, allow_special=False)))
