"""Our tokenizers as Hugging Face GPT-2 tokenizer files (model.hf_tokenizer), and exported with the model."""

import hashlib
import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model import GPT, GPTConfig, export_hf_gpt2, gpt2_tokenizer, train_bpe
from model.hf_tokenizer import hf_tokenizer_files
from model.tokenizer import ENDOFTEXT, bpe_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = ("The quick brown fox jumps over the lazy dog. Don't panic: it's 42 o'clock!\n\n"
          "Grüße aus Köln — naïve café, 東京 and 😀 emoji.\t   Tabs,   spaces\n<|user|>Hi<|endoftext|>") * 20
OPENAI_GPT2 = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
# Text around special tokens and the pieces of one, which must stay plain text.
PIECES = [ENDOFTEXT, "<|user|>", "<|", "|>", "endoftext", " ", "  ", "\n", "a", "é", "東", "😀", "'s", "42"]
BYTES = [bytes([byte]) for byte in range(256)]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, 400, special_tokens=[ENDOFTEXT, "<|user|>"])


@pytest.fixture(scope="module")
def loaded(bpe, tmp_path_factory) -> dict:
    """Our tokenizer and transformers' from its files, by name."""
    pairs = {}
    for tokenizer in (gpt2_tokenizer(), bpe):
        folder = tmp_path_factory.mktemp(tokenizer.name)
        for name, text in hf_tokenizer_files(tokenizer, 128).items():
            (folder / name).write_text(text, encoding="utf-8")
        pairs[tokenizer.name] = tokenizer, transformers.AutoTokenizer.from_pretrained(folder)
    return pairs


def openai_file(name: str) -> str:
    """One of OpenAI's GPT-2 tokenizer files, from tiktoken's cache (which names a file by its URL's sha1)."""
    cached = Path(os.environ.get("TIKTOKEN_CACHE_DIR", "")) / hashlib.sha1((OPENAI_GPT2 + name).encode()).hexdigest()
    if not cached.is_file():
        pytest.skip(f"tiktoken's cache holds no {name}")
    return cached.read_text(encoding="utf-8")


def test_gpt2_files_are_openais():
    files = hf_tokenizer_files(gpt2_tokenizer(), 1024)
    assert files["merges.txt"] == openai_file("vocab.bpe")
    assert json.loads(files["vocab.json"]) == json.loads(openai_file("encoder.json"))


@pytest.mark.parametrize("name", ["gpt2", "bpe"])
@settings(max_examples=300, deadline=None)
@given(text=st.text() | st.lists(st.sampled_from(PIECES), max_size=12).map("".join))
def test_transformers_encodes_and_decodes_as_we_do(loaded, name, text):
    ours, theirs = loaded[name]
    ids = ours.encode(text)
    assert theirs(text)["input_ids"] == ids
    assert theirs.decode(ids) == text


def test_export_with_our_bpe_stops_at_its_end_of_text(bpe, tmp_path):
    model = GPT(GPTConfig(vocab_size=bpe.vocab_size, context_length=32, n_layer=1, n_head=2, n_embd=16))
    export_hf_gpt2(model, tmp_path, bpe)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == bpe.eot_id
    assert transformers.GPT2LMHeadModel.from_pretrained(tmp_path).generation_config.eos_token_id == bpe.eot_id
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tokenizer.eos_token_id, tokenizer.model_max_length) == (bpe.eot_id, 32)


@pytest.mark.parametrize(("ranks", "pattern", "reason"), [
    (BYTES, r"\S+|\s+", "its own regex"),
    ([*BYTES, b"abc"], None, "not made by merging two lower-ranked tokens"),
    ([*BYTES, b"<|endoftext|>"], None, "also ordinary tokens"),
], ids=["regex", "unmergeable", "special_clash"])
def test_what_a_gpt2_tokenizer_cannot_express_is_refused_before_anything_is_written(ranks, pattern, reason, tmp_path):
    tokenizer = bpe_tokenizer(ranks, {ENDOFTEXT: len(ranks)}, **({"pattern": pattern} if pattern else {}))
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match=reason):
        export_hf_gpt2(model, tmp_path / "hf", tokenizer)
    assert not (tmp_path / "hf").exists()
