"""A Hugging Face tokenizer.json as a Tokenizer, run by the `tokenizers` library: for imported models whose
vocabulary is not GPT-2's (Llama 2's SentencePiece BPE with byte fallback, Llama 3's and Qwen's byte-level BPE,
or any other tokenizer.json).

Its spec, `{"type": "hf", "tokenizer_json": str, "eos_token": str}`, holds the file's text, so a checkpoint
carries its tokenizer as it does a BPE's ranks.

Text is made of each token's bytes, as tiktoken's tokenizers make it: a streamed reply, its logprobs and
bits-per-byte all see the same bytes. The bytes of a token come from the vocabulary as the decoder spells it:
GPT-2's printable stand-ins for the byte-level BPEs, "▁" for a space and <0xNN> for a byte in SentencePiece's.
Decoding therefore keeps the space SentencePiece marks before a text's first word, where transformers' decode
strips it.
"""

import json
import re

import tokenizers

from model.hf_tokenizer import BYTE_STAND_INS, hf_vocab
from model.json_text import parse_json
from model.tokenizer import Tokenizer, TokenizerError, gpt2_tokenizer

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback
SPACE_MARK = "\u2581"  # SentencePiece's "▁"
PROBE_TEXTS = ["Hello, world! It's 12:30.", "naïve café — 日本語 🤖", "  tabs\tand\nnewlines  ", "a" * 200 + "!"]


STAND_IN_BYTES = {char: byte for byte, char in enumerate(BYTE_STAND_INS)}


def _decoders(decoder) -> list[str]:
    if not isinstance(decoder, dict):
        return []
    if decoder.get("type") == "Sequence" and isinstance(decoder.get("decoders"), list):
        return [kind for part in decoder["decoders"] for kind in _decoders(part)]
    return [decoder.get("type")]


def _library_error(e: BaseException) -> bool:
    """Whether e is the tokenizers library's: its errors are plain Exceptions, and a panic in its Rust code (a
    regex past its backtracking limit) surfaces as a BaseException."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def _token_bytes(backend: tokenizers.Tokenizer, config: dict) -> list[bytes]:
    """Each id's bytes, as the tokenizer's decoder spells its tokens."""
    decoders = _decoders(config.get("decoder"))
    specials = {token["id"]: token["content"] for token in config.get("added_tokens", [])}
    stand_ins = STAND_IN_BYTES if "ByteLevel" in decoders else None
    table = []
    for token_id in range(backend.get_vocab_size(with_added_tokens=True)):
        token = backend.id_to_token(token_id)
        if token is None:
            table.append(b"")
        elif "ByteFallback" in decoders and (byte := BYTE_TOKEN.fullmatch(token)):
            table.append(bytes([int(byte.group(1), 16)]))
        elif token_id in specials:
            table.append(specials[token_id].encode("utf-8"))
        elif stand_ins is not None and all(char in stand_ins for char in token):
            table.append(bytes(stand_ins[char] for char in token))
        elif "Metaspace" in decoders or "Replace" in decoders:
            table.append(token.replace(SPACE_MARK, " ").encode("utf-8"))
        else:  # WordPiece's "##" and other decoders: the token as the library decodes it alone
            table.append(backend.decode([token_id], skip_special_tokens=False).encode("utf-8"))
    return table


def _without_prefix_space(config: dict) -> dict:
    """The tokenizer's config, but that it adds no space before a text (SentencePiece's "▁" before the first word):
    the config of parts that continue a text."""
    def strip(part: dict | None) -> dict | None:
        if not isinstance(part, dict):
            return part
        if part.get("type") == "Sequence":
            key = "normalizers" if "normalizers" in part else "pretokenizers"
            return {**part, key: [strip(p) for p in part.get(key, []) if p.get("type") != "Prepend"]}
        if part.get("type") == "Metaspace":
            return {**part, "prepend_scheme": "never", "add_prefix_space": False}
        return part

    normalizer = config.get("normalizer")
    if isinstance(normalizer, dict) and normalizer.get("type") == "Prepend":
        normalizer = None
    return {**config, "normalizer": strip(normalizer), "pre_tokenizer": strip(config.get("pre_tokenizer"))}


def _backend(tokenizer_json: str, special_tokens_as_text: bool) -> tokenizers.Tokenizer:
    backend = tokenizers.Tokenizer.from_str(tokenizer_json)
    backend.no_padding()
    backend.no_truncation()
    backend.encode_special_tokens = special_tokens_as_text
    return backend


def _cannot_encode(e: BaseException) -> BaseException:
    return TokenizerError(f"the model's tokenizer cannot encode this text: {e}") if _library_error(e) else e


class JsonTokenizer(Tokenizer):
    """model.tokenizer.Tokenizer's methods over a tokenizer.json instead of a tiktoken encoding."""

    def __init__(self, tokenizer_json: str, eos_token: str):
        try:
            config = json.loads(tokenizer_json)
            texts = {True: tokenizer_json, False: json.dumps(_without_prefix_space(config))}
            # by whether special tokens' text is one id, and whether the text is a continuation's first part
            self._backends = {(special, first): _backend(texts[first], special_tokens_as_text=not special)
                              for special in (True, False) for first in (True, False)}
            self._bytes = _token_bytes(self._backends[True, True], config)
        except BaseException as e:
            if not _library_error(e):
                raise
            raise ValueError(f"not a tokenizer.json the tokenizers library reads: {e}") from None
        backend = self._backends[True, True]
        eot_id = backend.token_to_id(eos_token)
        if eot_id is None:
            raise ValueError(f"the end-of-text token {eos_token!r} is not in the tokenizer's vocabulary")
        self._spec = {"type": "hf", "tokenizer_json": tokenizer_json, "eos_token": eos_token}
        self.eot_id = eot_id
        self.vocab_size = len(self._bytes)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of text, without the BOS a post-processor would add; special tokens as one id each when
        allowed, otherwise encoded as plain text."""
        return self.encode_part(text, first=True, allow_special=allow_special)

    def encode_batch(self, texts: list[str], allow_special: bool = True) -> list[list[int]]:
        try:
            return [e.ids for e in self._backends[allow_special, True].encode_batch(texts, add_special_tokens=False)]
        except BaseException as e:
            raise _cannot_encode(e) from None

    def encode_part(self, part: str, first: bool, allow_special: bool = True) -> list[int]:
        """As Tokenizer's, but a part that continues a text gets no SentencePiece space before it."""
        try:
            return self._backends[allow_special, first].encode(part, add_special_tokens=False).ids
        except BaseException as e:
            raise _cannot_encode(e) from None

    def token_bytes(self, ids) -> list[bytes]:
        """Each id's bytes; none for an id past the vocabulary (a model's padded embedding rows)."""
        table = self._bytes
        return [table[i] if 0 <= i < len(table) else b"" for i in ids]

    def decode_bytes(self, ids) -> bytes:
        return b"".join(self.token_bytes(ids))

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _is_gpt2(config: dict) -> bool:
    """Whether a tokenizer.json is GPT-2's byte-level BPE, which tiktoken runs faster."""
    model = config.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or config.get("normalizer"):
        return False
    if "ByteLevel" not in _decoders(config.get("decoder")):
        return False
    return model.get("vocab") == hf_vocab(gpt2_tokenizer())


def imported_tokenizer(tokenizer_json: str, hf_config: dict) -> Tokenizer:
    """The tokenizer of an imported Hugging Face model: tiktoken's GPT-2 for GPT-2's vocabulary, else the
    tokenizer.json through `tokenizers`, ending texts with the config's eos_token_id (the first of a list).
    ValueError naming what is wrong."""
    try:
        config = parse_json(tokenizer_json)
    except json.JSONDecodeError as e:
        raise ValueError(f"tokenizer.json is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"tokenizer.json must be a JSON object, not {type(config).__name__}")
    if _is_gpt2(config):
        return gpt2_tokenizer()
    eos_id = hf_config.get("eos_token_id")
    if isinstance(eos_id, list):
        eos_id = eos_id[0] if eos_id else None
    if type(eos_id) is not int:
        raise ValueError("config.json must name the end-of-text token: eos_token_id, an id of tokenizer.json")
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    vocab, added = model.get("vocab"), config.get("added_tokens")
    names = {}
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: token -> id
        names = {token_id: token for token, token_id in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [token, score] by id
        names = {token_id: entry[0] for token_id, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    if isinstance(added, list):
        names |= {token.get("id"): token.get("content") for token in added if isinstance(token, dict)}
    if not isinstance(names.get(eos_id), str):
        raise ValueError(f"config.json's eos_token_id {eos_id} is no token of tokenizer.json")
    tokenizer = JsonTokenizer(tokenizer_json, names[eos_id])
    try:  # one that cannot encode ordinary text is refused now, not at its first request
        tokenizer.encode_batch(PROBE_TEXTS)
    except TokenizerError as e:
        raise ValueError(str(e)) from None
    return tokenizer
