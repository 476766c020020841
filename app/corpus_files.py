"""Checking an uploaded corpus file: readable as its kind, with a clear error naming the first bad line."""

import codecs
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.enums import CorpusKind
from model import DataFormatError, gpt2_tokenizer, iter_classification_file, iter_instruction_file, label_order
from model.preference_data import iter_preference_file, preference_prompt

FORMATS = {CorpusKind.TEXT: ("txt",), CorpusKind.CLASSIFICATION: ("csv", "tsv", "jsonl"),
           CorpusKind.INSTRUCTION: ("json", "jsonl"), CorpusKind.PREFERENCE: ("json", "jsonl")}
TOKEN_COUNT_LIMIT_BYTES = 64 * 1024 * 1024  # larger text corpora are counted when a job tokenizes them
BLOCK_BYTES = 1 << 18


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


class _TextFile:
    """A text corpus read one block at a time, so that a line of any length costs one block of memory."""

    def __init__(self, path: Path):
        self.path, self.newlines, self.ends_with_newline = path, 0, False

    def blocks(self) -> Iterator[str]:
        """The decoded blocks; CorpusContentError names the line of a NUL byte (a binary file) or of the
        first byte that is not UTF-8."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        with open(self.path, "rb") as f:
            while block := f.read(BLOCK_BYTES):
                line = self.newlines + 1
                if (nul := block.find(b"\x00")) >= 0:
                    nul_line = line + block.count(b"\n", 0, nul)
                    raise CorpusContentError(f"line {nul_line}: a NUL byte: this looks like a binary file, "
                                             "not text")
                carried = len(decoder.getstate()[0])  # bytes of a character the previous block cut in two
                try:
                    text = decoder.decode(block)
                except UnicodeDecodeError as e:
                    bad_line = line + block.count(b"\n", 0, max(e.start - carried, 0))
                    raise CorpusContentError(f"line {bad_line}: not UTF-8") from None
                self.newlines += block.count(b"\n")
                self.ends_with_newline = block.endswith(b"\n")
                yield text
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise CorpusContentError(f"line {self.newlines + 1}: not UTF-8 (the file ends inside a "
                                     "character)") from None


def _check_text(path: Path) -> CorpusSummary:
    size = path.stat().st_size
    if size == 0:
        raise CorpusContentError("the file is empty")
    text = _TextFile(path)
    if size > TOKEN_COUNT_LIMIT_BYTES:
        n_tokens = None
        for _ in text.blocks():
            pass
    else:
        n_tokens = gpt2_tokenizer().count_tokens(text.blocks())
    return CorpusSummary(n_records=text.newlines + (not text.ends_with_newline), n_tokens=n_tokens)


def _check_records(path: Path, kind: CorpusKind) -> CorpusSummary:
    tokenizer = gpt2_tokenizer()
    n_records = n_tokens = 0
    if kind == CorpusKind.CLASSIFICATION:
        labels: set[str] = set()
        for text, label in iter_classification_file(path):
            n_records += 1
            n_tokens += tokenizer.count_tokens([text])
            labels.add(label)
        return CorpusSummary(n_records, n_tokens, label_order(path, labels))
    if kind == CorpusKind.PREFERENCE:
        for record in iter_preference_file(path):
            n_records += 1
            n_tokens += tokenizer.count_tokens([preference_prompt(record), record["chosen"], record["rejected"]])
    else:
        for record in iter_instruction_file(path):
            n_records += 1
            n_tokens += tokenizer.count_tokens([record["instruction"], record["input"], record["output"]])
    if not n_records:
        raise CorpusContentError(f"the file holds no {kind} records")
    return CorpusSummary(n_records, n_tokens)


def check_corpus(path: Path, kind: str) -> CorpusSummary:
    """Read the file (its suffix is its format) as a corpus of its kind, one block or record at a time;
    CorpusContentError names the first problem and where it is, never the server-side path."""
    if kind == CorpusKind.TEXT:
        return _check_text(path)
    try:
        return _check_records(path, CorpusKind(kind))
    except DataFormatError as e:
        place = f"{e.where} {e.line}: " if e.line is not None else ""
        raise CorpusContentError(place + e.problem) from None
