"""Our tokenizers as Hugging Face GPT-2 tokenizer files (vocab.json, merges.txt, tokenizer_config.json), which
AutoTokenizer.from_pretrained loads as a GPT2Tokenizer that gives the same ids as tiktoken.

Both are byte-level BPEs over GPT-2's pre-tokenization regex, written down differently: tiktoken ranks token byte
strings and joins the adjacent pair that makes the lowest-ranked token, while Hugging Face lists each merge as a
pair of tokens spelled with GPT-2's printable stand-ins for bytes. The pair that makes a token is the one BPE ends
with when it runs on the token's bytes with the lower ranks only; for GPT-2 this gives back OpenAI's merges.txt
line for line.
"""

import json
from itertools import pairwise

from model.tokenizer import ENDOFTEXT, GPT2_PATTERN, Tokenizer

VOCAB = "vocab.json"
MERGES = "merges.txt"
TOKENIZER_CONFIG = "tokenizer_config.json"
TOKENIZER_JSON = "tokenizer.json"
MERGES_VERSION = "#version: 0.2"  # the first line of GPT-2's merges.txt, which readers skip


def _byte_stand_ins() -> list[str]:
    """GPT-2's character for each byte: the byte itself where it is printable Latin-1, else one from U+0100 up,
    so that no token is spelled with whitespace or control characters."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


BYTE_STAND_INS = _byte_stand_ins()


def _spelled(token: bytes) -> str:
    return "".join(BYTE_STAND_INS[byte] for byte in token)


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens tiktoken's BPE joins into token: run on its bytes with the lower ranks alone, it stops at
    them. ValueError if it stops at more than two: then only a whole pre-token can be that token, which merges
    cannot express."""
    rank = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        # Lowest rank first and, as in tiktoken, the leftmost of equal pairs.
        lowest, i = min((ranks.get(left + right, rank), i) for i, (left, right) in enumerate(pairwise(parts)))
        if lowest >= rank:
            raise ValueError(f"token {rank} ({token!r}) is not made by merging two lower-ranked tokens, so "
                             f"Hugging Face's merges.txt cannot express it")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def _special_token(name: str) -> dict:
    # Matched in the text as tiktoken matches it: anywhere, as written, with no space taken on either side.
    return {"content": name, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
            "special": True}


def _specials_and_ranks(tokenizer: Tokenizer) -> tuple[dict[str, int], dict[bytes, int]]:
    encoding = tokenizer.encoding
    specials = {name: encoding.encode_single_token(name) for name in encoding.special_tokens_set}
    ranks = {encoding.decode_single_token_bytes(rank): rank for rank in range(encoding.n_vocab)
             if rank not in specials.values()}
    return specials, ranks


def hf_vocab(tokenizer: Tokenizer) -> dict[str, int]:
    """The vocab.json of a tiktoken-run tokenizer: each token spelled as Hugging Face spells it, special tokens
    as written."""
    specials, ranks = _specials_and_ranks(tokenizer)
    return {_spelled(token): rank for token, rank in ranks.items()} | specials


def _tokenizer_json_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, str]:
    """An imported tokenizer.json (model.tokenizer_json) as it came, for PreTrainedTokenizerFast."""
    spec = tokenizer.spec()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
              "eos_token": spec["eos_token"], "clean_up_tokenization_spaces": False}
    return {TOKENIZER_JSON: spec["tokenizer_json"], TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n"}


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, str]:
    """The text of tokenizer files, by file name, that make AutoTokenizer encode and decode as tokenizer does
    (special tokens included, matched wherever they occur): GPT-2's vocab.json and merges.txt for our BPEs, the
    tokenizer.json an imported model came with; ValueError if neither can."""
    if tokenizer.name == "hf":
        return _tokenizer_json_files(tokenizer, model_max_length)
    pattern = GPT2_PATTERN if tokenizer.name == "gpt2" else tokenizer.spec()["pattern"]
    if pattern != GPT2_PATTERN:
        raise ValueError(f"the tokenizer splits text with its own regex {pattern!r}; Hugging Face's GPT-2 "
                         f"tokenizer can only split it with GPT-2's")
    specials, ranks = _specials_and_ranks(tokenizer)
    vocab = {_spelled(token): rank for token, rank in ranks.items()}
    clashes = sorted(name for name in specials if name in vocab)
    if clashes:
        raise ValueError(f"special token(s) {', '.join(clashes)} are also ordinary tokens, which vocab.json "
                         f"cannot tell apart")
    merges = [" ".join(map(_spelled, _last_merge(token, ranks)))
              for token in sorted(ranks, key=ranks.__getitem__) if len(token) > 1]
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_prefix_space": False,
        # Decoding gives back the text as tiktoken does, without transformers' tidying of spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT,
        "added_tokens_decoder": {str(token_id): _special_token(name)
                                 for name, token_id in sorted(specials.items(), key=lambda item: item[1])},
    }
    return {
        VOCAB: json.dumps({**vocab, **specials}, ensure_ascii=False),
        MERGES: "\n".join([MERGES_VERSION, *merges]) + "\n",
        TOKENIZER_CONFIG: json.dumps(config, indent=2) + "\n",
    }
