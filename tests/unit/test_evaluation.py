import math

import numpy as np
import pytest
import torch

from model import GPT, GPTClassifier, GPTConfig, gpt2_tokenizer
from model.evaluation import (
    EvaluationStopped,
    classification_report,
    classify,
    exact_match,
    generate_responses,
    response_loss,
    score_tokens,
    scoring_windows,
    token_byte_lengths,
    token_f1,
)
from model.instruction_data import encode_instruction

CONFIG = GPTConfig.preset("nano", context_length=64)
TEXT = "The quick brown fox jumps over the lazy dog. " * 12 + "Ünïcödé ✓ 日本語."


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def byte_lengths(tokenizer):
    return token_byte_lengths(tokenizer)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


@pytest.mark.parametrize("n_tokens, block, stride", [(2, 8, 8), (9, 8, 8), (10, 8, 8), (50, 8, 3), (50, 8, 8),
                                                     (17, 16, 1), (100, 32, 16)])
def test_windows_score_every_target_once_with_enough_context(n_tokens, block, stride):
    seen = []
    length = min(block, n_tokens - 1)
    for start, first in scoring_windows(n_tokens, block, stride):
        assert start >= 0 and start + length <= n_tokens - 1
        targets = range(start + 1 + first, start + length + 1)
        seen += targets
        if start > 0:  # every target after the first window sees block - stride tokens or more
            assert all(t - start >= min(block - stride, t) for t in targets)
    assert seen == list(range(1, n_tokens))


def test_windows_reject_a_bad_stride_or_too_little_text():
    with pytest.raises(ValueError, match="stride"):
        scoring_windows(100, 8, 9)
    with pytest.raises(ValueError, match="at least one token"):
        scoring_windows(1, 8, 8)


def test_one_window_score_is_the_models_own_loss(model, tokenizer, byte_lengths):
    tokens = np.array(tokenizer.encode("Every effort moves you forward, one step at a time."))
    score = score_tokens(model, tokens, byte_lengths, block_size=64, stride=64)
    x, y = torch.tensor(tokens[None, :-1]), torch.tensor(tokens[None, 1:])
    assert score.n_tokens == len(tokens) - 1
    assert math.isclose(score.mean_loss, model(x, y)[1].item(), rel_tol=1e-5)
    assert score.perplexity == math.exp(score.mean_loss)


def test_sliding_windows_equal_a_loop_over_tokens(model, tokenizer, byte_lengths):
    tokens = np.array(tokenizer.encode(TEXT))
    score = score_tokens(model, tokens, byte_lengths, block_size=16, stride=5, batch_size=3,
                         bos_id=tokenizer.eot_id)
    sequence = np.concatenate([[tokenizer.eot_id], tokens])
    expected = 0.0
    for start, first in scoring_windows(len(sequence), 16, 5):
        x = torch.tensor(sequence[None, start: start + 16])
        logits = model(x)[0][0, first:]
        expected += torch.nn.functional.cross_entropy(
            logits, torch.tensor(sequence[start + 1 + first: start + 17]), reduction="sum").item()
    assert score.n_tokens == len(tokens) and score.n_bytes == len(TEXT.encode())  # every byte is scored
    assert math.isclose(score.loss_sum, expected, rel_tol=1e-5)


def test_bits_per_byte_starts_near_uniform_and_falls_with_training(tokenizer, byte_lengths):
    torch.manual_seed(0)
    model = GPT(CONFIG)
    tokens = np.array(tokenizer.encode(TEXT))
    before = score_tokens(model, tokens, byte_lengths, 32, 16, bos_id=tokenizer.eot_id)
    assert abs(before.bits_per_byte / before.uniform_bits_per_byte - 1) < 0.02
    assert math.isclose(before.mean_loss, math.log(50257), rel_tol=0.02)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.tensor(tokens[None, :64]), torch.tensor(tokens[None, 1:65])
    model.train()
    for _ in range(30):
        optimizer.zero_grad()
        model(x, y)[1].backward()
        optimizer.step()
    after = score_tokens(model, tokens, byte_lengths, 32, 16, bos_id=tokenizer.eot_id)
    assert after.bits_per_byte < 0.5 * before.bits_per_byte
    assert after.perplexity == math.exp(after.mean_loss)


def test_progress_can_stop_scoring(model, tokenizer, byte_lengths):
    calls = []

    def progress(done, total):
        calls.append((done, total))
        return done >= 2

    with pytest.raises(EvaluationStopped):
        score_tokens(model, np.array(tokenizer.encode(TEXT)), byte_lengths, 8, 8, batch_size=1, progress=progress)
    assert calls[:2] == [(1, calls[0][1]), (2, calls[0][1])] and len(calls) == 2


def test_classification_report_by_hand():
    # true:      a a a b b c ; predicted: a a b b c c
    probabilities = torch.tensor([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1],
                                  [0.1, 0.8, 0.1], [0.1, 0.2, 0.7], [0.0, 0.1, 0.9]])
    report = classification_report([0, 0, 0, 1, 1, 2], probabilities, ["a", "b", "c"])
    assert report["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert report["accuracy"] == 4 / 6 and report["correct"] == 4 and report["examples"] == 6
    a, b, c = (report["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (1.0, 2 / 3, 3)
    assert (b["precision"], b["recall"]) == (0.5, 0.5) and math.isclose(c["f1"], 2 / 3)
    assert math.isclose(report["macro_f1"], (0.8 + 0.5 + 2 / 3) / 3)
    expected_loss = -sum(math.log(p) for p in (0.9, 0.6, 0.2, 0.8, 0.2, 0.9)) / 6
    assert math.isclose(report["loss"], expected_loss, rel_tol=1e-6)


def test_a_class_never_predicted_scores_zero_not_an_error():
    report = classification_report([0, 1], torch.tensor([[0.9, 0.1], [0.8, 0.2]]), ["ham", "spam"])
    assert report["per_class"]["spam"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_classify_reads_each_text_regardless_of_batching(tokenizer):
    torch.manual_seed(0)
    model = GPTClassifier(CONFIG, 3).eval()
    texts = ["short", "a somewhat longer text to classify", "mid length text"]
    ids = torch.full((3, 12), tokenizer.eot_id)
    lengths = torch.tensor([len(tokenizer.encode(t)) for t in texts])
    for row, text in enumerate(texts):
        ids[row, : lengths[row]] = torch.tensor(tokenizer.encode(text))
    together = classify(model, ids, lengths, batch_size=3)
    alone = torch.cat([classify(model, ids[i: i + 1], lengths[i: i + 1]) for i in range(3)])
    assert together.shape == (3, 3) and torch.allclose(together.sum(-1), torch.ones(3))
    assert torch.allclose(together, alone, atol=1e-6)


def test_exact_match_and_token_f1():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("", "") == 1.0 and token_f1("", "x") == 0.0 and token_f1("dog", "cat") == 0.0
    assert token_f1("cat cat", "cat") == pytest.approx(2 * 0.5 * 1.0 / 1.5)


def test_response_loss_counts_only_response_tokens(model, tokenizer):
    records = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
               {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    encoded = [encode_instruction(r, tokenizer) for r in records]
    loss, count = response_loss(model, encoded, tokenizer.eot_id, batch_size=1)
    expected_count = sum(len(ids) - prompt + 1 for ids, prompt in encoded)  # response + end of text
    assert count == expected_count
    together, _ = response_loss(model, encoded, tokenizer.eot_id, batch_size=2)
    assert math.isclose(loss, together, rel_tol=1e-5)


def test_generated_responses_are_greedy_and_cut_at_the_next_section(model, tokenizer):
    records = [{"instruction": "Say hi.", "input": ""}, {"instruction": "Translate.", "input": "chat"}]
    first = generate_responses(model, tokenizer, records, max_new_tokens=12, batch_size=2)
    assert first == generate_responses(model, tokenizer, records, max_new_tokens=12, batch_size=1)
    assert len(first) == 2 and all(isinstance(r, str) and "###" not in r for r in first)


def test_logits_in_chunks_give_the_same_loss(model, tokenizer, byte_lengths, monkeypatch):
    import model.evaluation as evaluation

    tokens = np.array(tokenizer.encode(TEXT))
    whole = score_tokens(model, tokens, byte_lengths, 32, 16, bos_id=tokenizer.eot_id)
    encoded = [encode_instruction({"instruction": "Name a colour.", "input": "", "output": "Blue."}, tokenizer)]
    whole_response = response_loss(model, encoded, tokenizer.eot_id)
    monkeypatch.setattr(evaluation, "LOGIT_ROWS", 7)
    chunked = score_tokens(model, tokens, byte_lengths, 32, 16, bos_id=tokenizer.eot_id)
    assert math.isclose(chunked.loss_sum, whole.loss_sum, rel_tol=1e-6)
    assert math.isclose(response_loss(model, encoded, tokenizer.eot_id)[0], whole_response[0], rel_tol=1e-6)
