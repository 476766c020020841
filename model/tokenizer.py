"""Tokenizers: GPT-2's BPE through tiktoken, or a byte-level BPE trained on a corpus (model.bpe).

A tokenizer is described by a JSON-serialisable spec that travels inside every checkpoint, so a
checkpoint always decodes with the tokenizer it was trained with.
"""

import tiktoken

ENDOFTEXT = "<|endoftext|>"


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

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def decode_bytes(self, ids) -> bytes:
        return self.encoding.decode_bytes(list(ids))

    def spec(self) -> dict:
        return dict(self._spec)


def gpt2_tokenizer() -> Tokenizer:
    return Tokenizer(tiktoken.get_encoding("gpt2"), {"type": "gpt2"})


def tokenizer_from_spec(spec: dict) -> Tokenizer:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "gpt2":
        return gpt2_tokenizer()
    raise ValueError(f"unknown tokenizer spec type {kind!r}")
