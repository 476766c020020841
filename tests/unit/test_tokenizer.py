import base64
import json
import random
from functools import cache
from itertools import pairwise

import pytest
import regex
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st

from model.bpe import train_bpe
from model.tokenizer import (
    ENDOFTEXT,
    GPT2_PATTERN,
    bpe_tokenizer,
    get_tokenizer,
    gpt2_tokenizer,
    text_parts,
    tokenizer_from_spec,
)

SMALL_CORPUS = ("The quick brown fox jumps over the lazy dog. Don't panic: it's 42 o'clock!\n\n"
                "Grüße aus Köln — naïve café, 東京 and 😀 emoji.\t   Tabs,   spaces\n") * 20


@cache
def small_bpe():
    return train_bpe(SMALL_CORPUS, 320)


def verdict(shared_data) -> str:
    return (shared_data / "the-verdict.txt").read_text(encoding="utf-8")


def cut_before_spaces(text: str, cuts: list[int]) -> list[str]:
    """text cut at the allowed boundaries at or after the given offsets: just before a space that
    follows a non-space character, where train_bpe promises pieces train as the joined text."""
    allowed = [i for i in range(1, len(text)) if text[i] == " " and not text[i - 1].isspace()]
    points = sorted({next((a for a in allowed if a >= c), len(text)) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def test_gpt2_matches_tiktoken():
    tok = gpt2_tokenizer()
    assert tok.eot_id == 50256 and tok.encode(ENDOFTEXT) == [50256] and tok.vocab_size == 50257
    assert tok.encode("Hello, world") == [15496, 11, 995]
    assert tok.encode("Hello, world") == tiktoken.get_encoding("gpt2").encode("Hello, world")
    assert tok.spec() == {"type": "gpt2"} and tok.name == "gpt2"
    assert tokenizer_from_spec({"type": "gpt2"}).encode("Hello, world") == [15496, 11, 995]
    assert get_tokenizer("gpt2").eot_id == 50256


@settings(max_examples=200, deadline=None)
@given(text=st.text() | st.text(alphabet=" \t\n\r\u00a0aZ1'!", max_size=30))
def test_pattern_splits_as_tiktokens_gpt2(text):
    # tiktoken's gpt2 pat_str is GPT-2's regex rewritten with possessive quantifiers: same chunks.
    assert regex.findall(GPT2_PATTERN, text) == regex.findall(tiktoken.get_encoding("gpt2")._pat_str, text)


@pytest.mark.parametrize("make", [gpt2_tokenizer, small_bpe], ids=["gpt2", "bpe"])
@settings(max_examples=150, deadline=None)
@given(text=st.text())
def test_decode_inverts_encode(make, text):
    tok = make()
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, allow_special=False)) == text


def test_hand_checked_merges():
    # Wikipedia's BPE example as one chunk: "aa" (4 overlapping pairs) first, then the tie between
    # ("aa", "a") and ("a", "b") goes to the smaller ids, then "aa"+"ab"; "ac" wins the 1-count tie.
    tok = train_bpe("aaabdaaabac", 261)
    assert [base64.b64decode(r) for r in tok.spec()["ranks"][256:]] == [b"aa", b"ab", b"aaab", b"ac"]
    assert tok.encode("aaabdaaabac") == [258, ord("d"), 258, 259]
    assert tok.eot_id == 260


def test_trained_on_the_verdict(shared_data):
    text = verdict(shared_data)
    tok = train_bpe(text, 400)
    assert tok.vocab_size == 400 and tok.eot_id == 399 and tok.name == "bpe"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.6 * len(text.encode("utf-8"))
    assert tok.encode("the end" + ENDOFTEXT) == tok.encode("the end") + [399]
    assert 399 not in tok.encode(ENDOFTEXT, allow_special=False)

    spec = tok.spec()
    assert set(spec) == {"type", "pattern", "ranks", "special_tokens"}
    assert spec["special_tokens"] == {ENDOFTEXT: 399} and len(spec["ranks"]) == 399
    assert [base64.b64decode(r) for r in spec["ranks"][:256]] == [bytes([b]) for b in range(256)]
    loaded = tokenizer_from_spec(json.loads(json.dumps(spec)))
    assert loaded.spec() == spec
    assert loaded.encode(text) == ids and loaded.vocab_size == 400 and loaded.eot_id == 399


def test_training_is_deterministic_and_order_free(shared_data):
    pieces = cut_before_spaces(verdict(shared_data), list(range(0, 20000, 700)))
    spec = train_bpe(pieces, 350).spec()
    assert train_bpe(pieces, 350).spec() == spec
    random.Random(0).shuffle(pieces)
    assert train_bpe(pieces, 350).spec() == spec


def test_chunks_train_as_joined_text(shared_data):
    text = verdict(shared_data)
    pieces = cut_before_spaces(text, list(range(0, len(text), 997)))
    assert len(pieces) > 10 and "".join(pieces) == text
    assert train_bpe(iter(pieces), 400).spec() == train_bpe(text, 400).spec()


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="ab c1!'\n\t" + ENDOFTEXT[:3], max_size=200),
       cuts=st.lists(st.integers(0, 200), max_size=8))
def test_chunks_train_as_joined_text_property(text, cuts):
    pieces = cut_before_spaces(text, cuts)
    assert train_bpe(pieces, 300).spec() == train_bpe(text, 300).spec()


def test_special_tokens_stay_out_of_merges():
    tok = train_bpe(["hello" + ENDOFTEXT + "hello", ENDOFTEXT * 50], 300, special_tokens=(ENDOFTEXT, "<pad>"))
    merged = {base64.b64decode(r) for r in tok.spec()["ranks"][256:]}
    # Only "hello" was left to learn from; its pairs all tie, so the smallest ids merge first.
    assert merged == {b"el", b"lo", b"hel", b"hello"}  # then the pairs ran out: stopped early
    assert tok.vocab_size == 256 + 4 + 2 and tok.spec()["special_tokens"] == {ENDOFTEXT: 260, "<pad>": 261}
    assert tok.encode("hello<pad>hello") == [259, 261, 259]


def test_get_tokenizer_from_json_file(tmp_path):
    tok = small_bpe()
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(tok.spec()))
    assert get_tokenizer(path).spec() == tok.spec() == get_tokenizer(tok.spec()).spec()
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("gpt3")


@pytest.mark.parametrize("vocab_size, specials, match", [
    (256, (ENDOFTEXT,), "vocab_size"),
    (257, (ENDOFTEXT, "<pad>"), "vocab_size"),
    (300.0, (ENDOFTEXT,), "vocab_size"),
    (True, (ENDOFTEXT,), "vocab_size"),
    (300, ENDOFTEXT, "not the string"),
    (300, (ENDOFTEXT, ""), "non-empty"),
    (300, (ENDOFTEXT, ENDOFTEXT), "unique"),
    (300, ("<pad>",), "must include"),
])
def test_train_rejects_bad_arguments(vocab_size, specials, match):
    with pytest.raises(ValueError, match=match):
        train_bpe("some text", vocab_size, special_tokens=specials)


def test_train_rejects_non_str_pieces():
    with pytest.raises(TypeError, match="iterable of str"):
        train_bpe([b"bytes"], 300)


def _spec_with(**changes):
    spec = small_bpe().spec()
    spec.update(changes)
    return spec


def _ranks_with(index, value):
    ranks = small_bpe().spec()["ranks"]
    ranks[index] = value
    return ranks


@pytest.mark.parametrize("spec, match", [
    ({"type": "sentencepiece"}, "unknown tokenizer spec type"),
    ("gpt2", "unknown tokenizer spec type"),
    (_spec_with(vocab_size=320), "unknown \\['vocab_size'\\]"),
    ({"type": "bpe", "ranks": []}, "missing \\['pattern', 'special_tokens'\\]"),
    (_spec_with(pattern="(unclosed"), "not a valid regex"),
    (_spec_with(pattern=r"\X"), "tiktoken rejected"),  # fine for Python's regex, not for Rust's
    (_spec_with(ranks=_ranks_with(300, "not base64!")), "not valid base64"),
    (_spec_with(ranks=_ranks_with(300, small_bpe().spec()["ranks"][299])), "duplicates"),
    (_spec_with(ranks=_ranks_with(65, base64.b64encode(b"B").decode())), "single byte"),
    (_spec_with(ranks=_ranks_with(5, None)), "not valid base64"),
    (_spec_with(ranks=_ranks_with(300, "")), "empty"),
    (_spec_with(ranks=small_bpe().spec()["ranks"][:100]), "256 bytes come first"),
    (_spec_with(special_tokens={"<pad>": 319}), "including '<\\|endoftext\\|>'"),
    (_spec_with(special_tokens={ENDOFTEXT: 5}), "ids right after the ranks"),
    (_spec_with(special_tokens={ENDOFTEXT: 319, "<pad>": 321}), "ids right after the ranks"),
    (_spec_with(special_tokens={ENDOFTEXT: 319, "": 320}), "non-empty names"),
])
def test_bad_specs_are_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        tokenizer_from_spec(spec)


def test_bpe_tokenizer_rejects_duplicate_tokens():
    ranks = [bytes([b]) for b in range(256)] + [b"ab", b"ab"]
    with pytest.raises(ValueError, match="duplicates"):
        bpe_tokenizer(ranks, {ENDOFTEXT: 258})


@settings(max_examples=200, deadline=None)
@given(pieces=st.lists(st.sampled_from(list("ab Z9'.,!\n\t\r\u00a0é😀") + ["'s", "<|endoftext|>", "  x"]),
                       max_size=80),
       part_chars=st.integers(1, 12))
def test_text_parts_cut_only_where_the_tokens_stay_the_same(pieces, part_chars):
    tok = gpt2_tokenizer()
    text = "".join(pieces)
    parts = list(text_parts(pieces, part_chars))
    assert "".join(parts) == text
    assert [i for part in parts for i in tok.encode(part)] == tok.encode(text)


def test_text_parts_cut_a_spaceless_run_only_past_its_bound():
    assert list(text_parts(["ab cd ef"], 2)) == ["ab", " cd", " ef"]
    assert list(text_parts(["x" * 20, " y"], 5)) == ["x" * 20, " y"]  # read on until a space comes
    assert list(text_parts(["x" * 20, " y"], 5, max_part_chars=8)) == ["x" * 8, "x" * 8, "xxxx", " y"]


def test_count_tokens_holds_a_bounded_part_of_a_long_text(shared_data, monkeypatch):
    tok = gpt2_tokenizer()
    text = verdict(shared_data)
    monkeypatch.setattr("model.tokenizer.COUNT_PART_CHARS", 64)
    encoded = []
    real_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda part, allow_special: encoded.append(len(part)) or real_encode(
        part, allow_special))
    pieces = [text[i:i + 1000] for i in range(0, len(text), 1000)]
    assert tok.count_tokens(pieces) == len(real_encode(text, allow_special=False)) == 5145
    assert max(encoded) <= 4 * 64 and len(encoded) > len(text) // (4 * 64)
    assert tok.count_tokens(["<|endoftext|>"]) == len(real_encode("<|endoftext|>", allow_special=False)) > 1
    assert tok.count_tokens([]) == tok.count_tokens([""]) == 0
