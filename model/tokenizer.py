"""Tokenizers: GPT-2's BPE through tiktoken, or a byte-level BPE trained on a corpus (model.bpe).

A tokenizer is described by a JSON-serialisable spec that travels inside every checkpoint, so a
checkpoint always decodes with the tokenizer it was trained with:

- `{"type": "gpt2"}`: tiktoken's GPT-2 encoding;
- `{"type": "hf", ...}`: a Hugging Face tokenizer.json (model.tokenizer_json), for imported models;
- `{"type": "bpe", "pattern": str, "ranks": [str, ...], "special_tokens": {str: int}}`: a byte-level BPE.
  `ranks[i]` is the base64 of the bytes of token i: the 256 single bytes in byte order, then one token
  per merge in the order the merges were learned (tiktoken merges by lowest rank, so rank = merge order).
  Special tokens take the ids right after the ranks, and "<|endoftext|>" must be one of them.
  `pattern` is the pre-tokenization regex (model.bpe trains with GPT-2's).
"""

import base64
import binascii
import copy
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import regex
import tiktoken

ENDOFTEXT = "<|endoftext|>"
# The pat_str of tiktoken's gpt2 encoding: text is split into these chunks before any merge, so no
# token spans a letter/digit/punctuation boundary and each word's leading space stays with it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_BPE_KEYS = ("type", "pattern", "ranks", "special_tokens")
COUNT_PART_CHARS = 1 << 18  # count_tokens encodes about this much text at once: an id costs ~36 B
_WORD_START = regex.compile(r"(?<=\S) ")  # where text_parts may cut
_LAST_WORD_START = regex.compile(r"(?r)(?<=\S) ")  # the same, searched right to left


class TokenizerError(ValueError):
    """The tokenizer cannot encode this text (an imported tokenizer.json's own failure)."""


class Tokenizer:
    def __init__(self, encoding: tiktoken.Encoding, spec: dict):
        self.encoding = encoding
        self._spec = spec
        self.eot_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab

    @property
    def name(self) -> str:
        return self._spec["type"]

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of text; special tokens such as <|endoftext|> are kept as one id when allowed,
        otherwise encoded as plain text."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode(text, disallowed_special=())

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        if allow_special:
            return self.encoding.encode_batch(texts, allowed_special="all")
        return self.encoding.encode_batch(texts, disallowed_special=())

    def count_tokens(self, pieces: Iterable[str]) -> int:
        """The number of tokens (special-token text counted as plain text) of the text the pieces make up,
        holding at most 4 x COUNT_PART_CHARS of it at a time (text_parts): exact but for the rare part cut
        where no space allowed it."""
        parts = text_parts(pieces, COUNT_PART_CHARS, max_part_chars=4 * COUNT_PART_CHARS)
        return sum(len(self.encode_part(part, first=i == 0, allow_special=False)) for i, part in enumerate(parts))

    def encode_part(self, part: str, first: bool, allow_special: bool = True) -> list[int]:
        """The ids of one of the consecutive parts of a text (text_parts): its first, or one that continues it."""
        return self.encode(part, allow_special)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def token_bytes(self, ids) -> list[bytes]:
        """Each id's own bytes (a token may hold part of a character)."""
        return self.encoding.decode_tokens_bytes(list(ids))

    def spec(self) -> dict:
        # A deep copy: a caller editing the returned ranks must not change what this tokenizer saves.
        return copy.deepcopy(self._spec)


def text_parts(pieces: Iterable[str], part_chars: int, max_part_chars: int | None = None) -> Iterator[str]:
    """The text the pieces make up, in consecutive parts of about part_chars characters, each cut just
    before a space that follows a non-space character. Cutting there never changes the tokens: GPT-2-style
    pre-tokenizers end every letter, digit and punctuation run at whitespace and never look behind, so the
    pre-token before the cut ends exactly at it, and the one starting with the space is matched from the
    same position either way (a cut after whitespace would not be safe: "\\n\\n" followed by text is two
    pre-tokens, at the end of a part one). So encoding the parts one by one gives the tokens of the whole
    text. While no such space comes, a part grows; past max_part_chars it is cut anyway, and the tokens
    at that cut may differ."""
    carry, scanned = "", 0  # scanned: carry up to here holds no cut past the current part
    for piece in pieces:
        carry += piece
        start = 0
        while len(carry) - start > part_chars:
            window_end = start + part_chars + 1
            space = (_LAST_WORD_START.search(carry, start + 1, window_end)
                     or _WORD_START.search(carry, max(window_end, scanned)))
            if space:
                cut = space.start()
            elif max_part_chars is not None and len(carry) - start > max_part_chars:
                cut = start + max_part_chars
            else:  # one very long word or run of whitespace: read on
                scanned = len(carry)
                break
            yield carry[start:cut]
            start = cut
        carry, scanned = carry[start:], max(scanned - start, 0)
    if carry:
        yield carry


def gpt2_tokenizer() -> Tokenizer:
    return Tokenizer(tiktoken.get_encoding("gpt2"), {"type": "gpt2"})


def bpe_tokenizer(ranks: list[bytes], special_tokens: dict[str, int],
                  pattern: str = GPT2_PATTERN) -> Tokenizer:
    """A byte-level BPE Tokenizer from token bytes in rank order and special token ids (see the module
    docstring for the rules both must follow); ValueError if they break them."""
    spec = {"type": "bpe", "pattern": pattern,
            "ranks": [base64.b64encode(token).decode("ascii") for token in ranks],
            "special_tokens": dict(special_tokens)}
    return _bpe_from_spec(spec)


def _bpe_from_spec(spec: dict) -> Tokenizer:
    unknown = sorted(set(spec) - set(_BPE_KEYS))
    missing = [k for k in _BPE_KEYS if k not in spec]
    if unknown or missing:
        raise ValueError(f"bpe spec must have exactly the keys {list(_BPE_KEYS)}; "
                         f"missing {missing}, unknown {unknown}")
    pattern, ranks_b64, special_tokens = spec["pattern"], spec["ranks"], spec["special_tokens"]

    if not isinstance(pattern, str) or not pattern:
        raise ValueError("bpe spec 'pattern' must be a non-empty regex string")
    try:
        regex.compile(pattern)
    except regex.error as e:
        raise ValueError(f"bpe spec 'pattern' is not a valid regex: {e}") from None

    if not isinstance(ranks_b64, list):
        raise ValueError("bpe spec 'ranks' must be a list of base64 strings")
    mergeable_ranks: dict[bytes, int] = {}
    for rank, b64 in enumerate(ranks_b64):
        try:
            token = base64.b64decode(b64, validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise ValueError(f"bpe spec 'ranks'[{rank}] is not valid base64: {b64!r}") from None
        if rank < 256 and token != bytes([rank]):
            # Every byte must be a token or some text could not be encoded; fixing their order keeps
            # the format canonical, so equal vocabularies have equal specs.
            raise ValueError(f"bpe spec 'ranks'[{rank}] must be the single byte {bytes([rank])!r}, "
                             f"got {token!r}: ranks start with the 256 bytes in byte order")
        if not token:
            raise ValueError(f"bpe spec 'ranks'[{rank}] is empty; every token has at least one byte")
        if token in mergeable_ranks:
            raise ValueError(f"bpe spec 'ranks'[{rank}] duplicates 'ranks'[{mergeable_ranks[token]}] "
                             f"({token!r})")
        mergeable_ranks[token] = rank
    if len(mergeable_ranks) < 256:
        raise ValueError(f"bpe spec 'ranks' has {len(mergeable_ranks)} tokens; the 256 bytes come first")

    if not isinstance(special_tokens, dict) or ENDOFTEXT not in special_tokens:
        raise ValueError(f"bpe spec 'special_tokens' must be a dict of name -> id including {ENDOFTEXT!r}")
    ids = list(special_tokens.values())
    expected = list(range(len(mergeable_ranks), len(mergeable_ranks) + len(special_tokens)))
    if (any(not isinstance(name, str) or not name for name in special_tokens)
            or any(type(i) is not int for i in ids) or sorted(ids) != expected):
        raise ValueError(f"bpe spec 'special_tokens' must map non-empty names to the ids right after the "
                         f"ranks, {expected[0]}..{expected[-1]} each once; got {special_tokens}")

    try:
        encoding = tiktoken.Encoding("scratchllm-bpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=dict(special_tokens))
    except ValueError as e:  # tiktoken compiles the pattern again with Rust's fancy-regex, stricter
        raise ValueError(f"tiktoken rejected the bpe spec: {e}") from e
    return Tokenizer(encoding, spec)


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "gpt2":
        return gpt2_tokenizer()
    if kind == "bpe":
        return _bpe_from_spec(copy.deepcopy(spec))
    if kind == "hf":
        from model.tokenizer_json import JsonTokenizer  # a subclass of Tokenizer, so imported here

        unknown = sorted(set(spec) - {"type", "tokenizer_json", "eos_token"})
        if unknown or not all(isinstance(spec.get(k), str) for k in ("tokenizer_json", "eos_token")):
            raise ValueError("hf spec must have exactly the string keys 'tokenizer_json' and 'eos_token'")
        return JsonTokenizer(spec["tokenizer_json"], spec["eos_token"])
    raise ValueError(f"unknown tokenizer spec type {kind!r}")


def get_tokenizer(name_or_spec: str | os.PathLike | dict) -> Tokenizer:
    """A Tokenizer from a spec dict, the name "gpt2", or the path of a JSON file holding a spec
    (e.g. `json.dump(train_bpe(...).spec(), f)`)."""
    if isinstance(name_or_spec, dict):
        return tokenizer_from_spec(name_or_spec)
    if name_or_spec == "gpt2":
        return gpt2_tokenizer()
    path = Path(name_or_spec)
    if path.suffix != ".json" or not path.is_file():
        raise ValueError(f"unknown tokenizer {name_or_spec!r}: expected 'gpt2', a spec dict or a .json file "
                         "holding one")
    return tokenizer_from_spec(json.loads(path.read_text(encoding="utf-8")))
