"""A Hugging Face tokenizer.json as a Tokenizer (model.tokenizer_json): ids as transformers' fast tokenizer
gives them, bytes that make the text back, a spec that travels in checkpoints, GPT-2's own file run by tiktoken."""

import json

import pytest
import torch
from tokenizers import Tokenizer as Backend
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from model import GPT, GPTConfig, load_checkpoint, save_checkpoint
from model.data import open_tokens, tokenize_to_memmap
from model.evaluation import token_byte_lengths
from model.hf_tokenizer import hf_tokenizer_files
from model.tokenizer import get_tokenizer, gpt2_tokenizer, tokenizer_from_spec
from model.tokenizer_json import JsonTokenizer, imported_tokenizer
from tests.helpers import byte_level, sentencepiece

TEXTS = ["Hello wörld — 日本語 <|end_of_text|></s> \n\n  x", "  leading spaces\tand tabs", "emoji 🦙🦙 and ünïcödé",
         "</s> at the start", ""]


@pytest.fixture(scope="module")
def corpus(shared_data) -> str:
    return (shared_data / "the-verdict.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def backend(request, corpus) -> tuple[Backend, str]:
    if request.param == "byte_level":
        return byte_level(corpus), "<|end_of_text|>"
    return sentencepiece(corpus), "</s>"


def test_ids_are_the_fast_tokenizers_and_bytes_give_the_text_back(backend, corpus):
    backend, eos = backend
    tokenizer = JsonTokenizer(backend.to_str(), eos)
    reference = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tokenizer.eot_id == backend.token_to_id(eos)
    assert tokenizer.vocab_size == backend.get_vocab_size(with_added_tokens=True)
    for text in [*TEXTS, corpus[:3000]]:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert tokenizer.encode_batch([text, text]) == [ids, ids]
        # text is made of the tokens' bytes, as transformers decodes them, but that SentencePiece's mark before the
        # first word stays a space
        expected = reference.decode(ids)
        assert tokenizer.decode(ids) in (expected, " " + expected)
        assert text in (expected, expected.replace(f"{eos}  ", f"{eos} "))  # SentencePiece marks a space after </s>
        assert tokenizer.decode_bytes(ids) == b"".join(tokenizer.token_bytes(ids))
    assert tokenizer.count_tokens([corpus[:5000], corpus[5000:9000]]) == len(
        tokenizer.encode(corpus[:9000], allow_special=False))


def test_special_tokens_are_one_id_only_when_allowed(backend):
    backend, eos = backend
    tokenizer = JsonTokenizer(backend.to_str(), eos)
    text = f"a{eos}b"
    assert tokenizer.eot_id in tokenizer.encode(text)
    plain = tokenizer.encode(text, allow_special=False)
    assert tokenizer.eot_id not in plain
    assert tokenizer.decode(plain).strip() == text


def test_bytes_of_split_characters_join_into_the_character(corpus):
    tokenizer = JsonTokenizer(sentencepiece(corpus).to_str(), "</s>")
    ids = tokenizer.encode("日")  # no merge learned it: three byte-fallback tokens
    assert [len(b) for b in tokenizer.token_bytes(ids)][-3:] == [1, 1, 1]
    assert tokenizer.decode_bytes(ids).endswith("日".encode())
    assert token_byte_lengths(tokenizer)[ids[-1]] == 1


def test_the_spec_travels_in_a_checkpoint(backend, tmp_path):
    backend, eos = backend
    tokenizer = JsonTokenizer(backend.to_str(), eos)
    assert tokenizer.name == "hf"
    again = tokenizer_from_spec(json.loads(json.dumps(tokenizer.spec())))
    assert again.encode(TEXTS[0]) == tokenizer.encode(TEXTS[0]) and again.eot_id == tokenizer.eot_id
    model = GPT(GPTConfig.preset("llama-nano", vocab_size=tokenizer.vocab_size + 7))  # padded rows, as Qwen's
    save_checkpoint(tmp_path / "ckpt", model, tokenizer)
    loaded, loaded_tokenizer, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded_tokenizer.encode(TEXTS[2]) == tokenizer.encode(TEXTS[2])
    assert loaded_tokenizer.token_bytes([tokenizer.vocab_size + 3]) == [b""]  # a padded row decodes to nothing
    assert torch.equal(loaded.wte.weight, model.wte.weight)


@pytest.mark.parametrize("spec", [
    {"type": "hf", "tokenizer_json": "{}", "eos_token": "</s>"},
    {"type": "hf", "tokenizer_json": "not json", "eos_token": "</s>"},
    {"type": "hf", "tokenizer_json": '{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}',
     "eos_token": "</s>"},
    {"type": "hf", "tokenizer_json": "[" * 10000, "eos_token": "</s>"},
    {"type": "hf", "tokenizer_json": "{}"},
    {"type": "hf", "tokenizer_json": 3, "eos_token": "</s>"},
])
def test_broken_specs_are_value_errors(spec):
    with pytest.raises(ValueError):
        get_tokenizer(spec)


def test_gpt2s_own_tokenizer_json_runs_on_tiktoken(tmp_path):
    files = hf_tokenizer_files(gpt2_tokenizer(), 1024)
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    gpt2_json = GPT2TokenizerFast.from_pretrained(tmp_path).backend_tokenizer.to_str()
    assert imported_tokenizer(gpt2_json, {"eos_token_id": 50256}).name == "gpt2"


def test_the_end_of_text_token_comes_from_the_config(corpus):
    tokenizer_json = byte_level(corpus).to_str()
    im_end = Backend.from_str(tokenizer_json).token_to_id("<|im_end|>")
    assert imported_tokenizer(tokenizer_json, {"eos_token_id": [im_end, 0]}).eot_id == im_end
    for config, message in (({}, "eos_token_id"), ({"eos_token_id": 10**6}, "no token"),
                            ({"eos_token_id": "x"}, "eos_token_id")):
        with pytest.raises(ValueError, match=message):
            imported_tokenizer(tokenizer_json, config)
    with pytest.raises(ValueError, match="JSON object"):
        imported_tokenizer("[]", {"eos_token_id": 0})


def test_a_corpus_tokenizes_to_the_same_ids_in_parts(backend, corpus, tmp_path):
    """Jobs over an imported model (continued pretraining, evaluation) tokenize corpora part by part."""
    backend, eos = backend
    tokenizer = JsonTokenizer(backend.to_str(), eos)
    (tmp_path / "corpus.txt").write_text(corpus, encoding="utf-8")
    tokenize_to_memmap(tmp_path / "corpus.txt", tokenizer, tmp_path / "corpus.bin", chunk_chars=1000)
    assert open_tokens(tmp_path / "corpus.bin").tolist() == tokenizer.encode(corpus)


@pytest.mark.parametrize("config, eos_id, message", [
    ({"model": "x"}, 0, "no token"),
    ({"model": None, "decoder": {"type": "Sequence", "decoders": "x"}}, 0, "no token"),
    ({"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "x"}}, 0, "cannot encode"),  # no [UNK]
    ({"model": {"type": "Unigram", "vocab": [["a", -1.0], ["b", -2.0]]}}, 5, "no token"),
    ({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "zz"]]}}, 0, "zz"),
])
def test_a_tokenizer_json_the_library_cannot_run_is_a_value_error(config, eos_id, message):
    with pytest.raises(ValueError, match=message):
        imported_tokenizer(json.dumps(config), {"eos_token_id": eos_id})


def test_a_unigram_vocabulary_names_its_end_of_text_token():
    unigram = {"model": {"type": "Unigram", "unk_id": 0, "vocab": [["<unk>", 0.0], ["</s>", 0.0], ["▁a", -1.0],
                                                                   ["a", -2.0], ["▁", -3.0]]}}
    tokenizer = imported_tokenizer(json.dumps(unigram), {"eos_token_id": 1})
    assert tokenizer.eot_id == 1 and tokenizer.encode("a")
