import json
import tracemalloc

import pytest

from app.corpus_files import BLOCK_BYTES, CorpusContentError, check_corpus
from core.enums import CorpusKind
from model import gpt2_tokenizer

FILE_BYTES = 8_000_000
PEAK_BYTES = 4_000_000  # a block of text, a part of it and its token ids; reading the file whole took 11 times its size


def peak_bytes_checking(path, kind):
    tracemalloc.start()
    try:
        summary = check_corpus(path, kind)
        return summary, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind, name", [(CorpusKind.TEXT, "one-line.txt"), (CorpusKind.CLASSIFICATION, "d.jsonl"),
                                        (CorpusKind.INSTRUCTION, "d.json"), (CorpusKind.INSTRUCTION, "d.jsonl")])
def test_a_corpus_is_checked_without_holding_the_file(tmp_path, kind, name):
    path = tmp_path / name
    words = " the quick brown fox jumps over the lazy dog," * 20  # repeats into the same tokens
    if kind == CorpusKind.TEXT:
        count = FILE_BYTES // len(words)
        path.write_text(words * count)
        expected = (1, gpt2_tokenizer().count_tokens([words]) * count)
    elif kind == CorpusKind.CLASSIFICATION:
        row = json.dumps({"text": words, "label": "a"}) + "\n" + json.dumps({"text": words, "label": "b"}) + "\n"
        count = FILE_BYTES // len(row)
        path.write_text(row * count)
        expected = (2 * count, 2 * count * gpt2_tokenizer().count_tokens([words]))
    else:
        record = {"instruction": words, "input": "", "output": "ok"}
        count = FILE_BYTES // len(json.dumps(record))
        records = [record] * count
        path.write_text(json.dumps(records) if name.endswith(".json") else
                        "".join(json.dumps(r) + "\n" for r in records))
        expected = (count, count * gpt2_tokenizer().count_tokens([words + "ok"]))
    summary, peak = peak_bytes_checking(path, kind)
    assert (summary.n_records, summary.n_tokens) == expected
    assert peak < PEAK_BYTES, f"checking a {FILE_BYTES:,}-byte file held {peak:,} bytes"


@pytest.mark.parametrize("content, message", [
    (b"ok\n" + b"x" * 3_000_000 + b"\x00", "line 2: a NUL byte"),
    (b"ok\n" * 700_000 + "caf\u00e9".encode() + b"\n\xe9", "line 700002: not UTF-8"),
    (b"one\ntwo \xe2\x82", "line 2: not UTF-8 (the file ends inside a character)"),
])
def test_a_text_corpus_names_the_line_of_its_first_bad_byte(tmp_path, content, message):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusContentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_corpus(path, CorpusKind.TEXT)


def test_a_character_cut_by_a_block_boundary_is_fine(tmp_path):
    path = tmp_path / "t.txt"
    text = "a" * (BLOCK_BYTES - 1) + "\u00e9\n\u4e2d"  # é straddles the first block's end
    path.write_text(text)
    summary = check_corpus(path, CorpusKind.TEXT)
    assert summary.n_records == 2 and summary.n_tokens == len(gpt2_tokenizer().encode(text))
