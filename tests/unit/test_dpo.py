import contextlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, gpt2_tokenizer
from model.classification_data import DataFormatError
from model.dpo import DPOObjective, pair_logprobs, preference_scores, sequence_logprobs, without_dropout
from model.evaluation import EvaluationStopped
from model.instruction_data import encode_instruction
from model.preference_data import (
    PreferencePair,
    encode_preference,
    preference_prompt,
    read_preference_file,
    response_batch,
)
from model.trainer import TrainConfig, Trainer

CONFIG = GPTConfig(vocab_size=50257, context_length=32, n_layer=2, n_head=4, n_embd=32)  # no dropout: policy == ref
ALPACA = {"instruction": "Name a color.", "chosen": "Blue.", "rejected": "Seven."}
RAW = {"prompt": "Q: 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"}


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


# --- reading ----------------------------------------------------------------------------------------


def test_reads_both_forms_from_a_json_list_and_from_jsonl(tmp_path):
    records = [ALPACA, {**ALPACA, "input": "A sky."}, RAW]
    (tmp_path / "list.json").write_text(json.dumps(records))
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    for name in ("list.json", "lines.jsonl"):
        read = read_preference_file(tmp_path / name)
        assert read == [{**ALPACA, "input": ""}, {**ALPACA, "input": "A sky."}, RAW]


def test_the_prompt_is_the_alpaca_prompt_up_to_the_response_or_the_raw_prompt():
    assert preference_prompt({**ALPACA, "input": "A sky."}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Input:\nA sky.\n\n### Response:\n")
    assert preference_prompt(RAW) == RAW["prompt"]


@pytest.mark.parametrize(("record", "problem"), [
    ({"instruction": "x", "rejected": "b"}, "missing field 'chosen'"),
    ({"prompt": "x", "chosen": "a"}, "missing field 'rejected'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'instruction' (or 'prompt')"),
    ({**ALPACA, "rejected": " Blue. "}, "'chosen' and 'rejected' are the same text"),
    ({**ALPACA, "chosen": "  "}, "empty 'chosen'"),
    ({**RAW, "prompt": ""}, "empty 'prompt'"),
    ({**ALPACA, "rejected": 3}, "'rejected' must be a string, got int"),
    ({**ALPACA, "input": None}, "'input' must be a string, got NoneType"),
    ({**ALPACA, "prompt": "x"}, "both 'prompt' and 'instruction'"),
    (["a", "b"], "expected a JSON object, got list"),
])
def test_bad_records_are_refused_naming_the_record_and_field(tmp_path, record, problem):
    (tmp_path / "list.json").write_text(json.dumps([ALPACA, record]))
    with pytest.raises(DataFormatError, match="record 2: ") as raised:
        read_preference_file(tmp_path / "list.json")
    assert problem in str(raised.value)
    (tmp_path / "lines.jsonl").write_text(json.dumps(ALPACA) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataFormatError, match="line 2: ") as raised:
        read_preference_file(tmp_path / "lines.jsonl")
    assert raised.value.problem.startswith(problem)


def test_an_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataFormatError, match="no records"):
        read_preference_file(tmp_path / "empty.json")


# --- encoding ---------------------------------------------------------------------------------------


def test_a_response_ends_as_instruction_finetuning_ends_it(tok):
    pair = encode_preference({**ALPACA, "input": ""}, tok)
    ids, _ = encode_instruction({**ALPACA, "input": "", "output": ALPACA["chosen"]}, tok)
    assert pair.prompt + pair.chosen == ids + [tok.eot_id]  # instruction_collate's end-of-text target
    assert pair.rejected == tok.encode("Seven.") + [tok.eot_id]


def test_truncation_keeps_the_prompt_and_cuts_the_responses(tok):
    record = {"prompt": "one two three", "chosen": " four five six seven", "rejected": " eight"}
    pair = encode_preference(record, tok, max_length=5)  # the model reads 5 positions: 6 tokens per sequence
    assert pair.prompt == tok.encode("one two three")
    assert pair.chosen == tok.encode(" four five six")  # cut: no end-of-text
    assert pair.rejected == tok.encode(" eight") + [tok.eot_id]
    long_prompt = encode_preference(record, tok, max_length=2)
    assert long_prompt.prompt == tok.encode(" two three") and long_prompt.chosen == tok.encode(" four")


def test_response_batch_masks_the_prompt_and_the_padding():
    inputs, targets = response_batch([([1, 2], [3, 4]), ([5], [6])], pad_id=0)
    assert inputs.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert targets.tolist() == [[-100, 3, 4], [6, -100, -100]]


# --- log-probabilities and the loss -----------------------------------------------------------------


def test_sequence_logprobs_sum_the_response_tokens_given_the_prompt(model):
    prompt, response = [10, 11, 12], [13, 14, 50256]
    inputs, targets = response_batch([(prompt, response)], pad_id=50256)
    by_hand = 0.0
    logits = model(torch.tensor([prompt + response[:-1]]))[0][0]
    for position, token in enumerate(response, start=len(prompt) - 1):
        by_hand += F.log_softmax(logits[position], dim=-1)[token].item()
    assert sequence_logprobs(model, inputs, targets).item() == pytest.approx(by_hand, abs=1e-4)
    wrapped = Wrapper(model)  # as DDP or torch.compile wrap it: logits of every position, through forward
    assert sequence_logprobs(wrapped, inputs, targets).item() == pytest.approx(by_hand, abs=1e-4)


class Wrapper(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx)


def test_padding_does_not_change_a_pair_s_logprobs(model):
    short = PreferencePair([5, 6], [7, 50256], [8, 9, 50256])
    long = PreferencePair([5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 50256], [15, 50256])
    alone = pair_logprobs(model, [short], pad_id=50256)
    padded = pair_logprobs(model, [short, long], pad_id=50256)
    assert alone.shape == (1, 2) and padded.shape == (2, 2)
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)


def synthetic_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Random prompts, then the same random word before the end: 7 in chosen, 8 in rejected."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(100, 400, (int(torch.randint(2, 8, (1,), generator=g)),), generator=g).tolist()
        word = int(torch.randint(100, 400, (1,), generator=g))
        pairs.append(PreferencePair(prompt, [word, 7, 50256], [word, 8, 50256]))
    return pairs


def dpo_task(model, batch_size=8, **kwargs) -> DPOObjective:
    train, val = synthetic_pairs(64, 1), synthetic_pairs(16, 2)
    return DPOObjective(train, val, pair_logprobs(model, train, 50256, batch_size),
                        pair_logprobs(model, val, 50256, batch_size), batch_size=batch_size, **kwargs)


def test_at_the_start_the_loss_is_log_2_and_no_pair_is_won(model):
    task = dpo_task(model, seed=3)
    assert task.loss(model, task.batch(0)).item() == pytest.approx(math.log(2), abs=1e-5)
    metrics = task.evaluate(model, max_batches=10, autocast=contextlib.nullcontext)
    assert metrics == {"val_loss": pytest.approx(math.log(2)), "val_reward_margin": 0.0,
                       "val_preference_accuracy": 0.0}  # margins are exactly 0: a tie is no win


def test_batches_are_a_pure_function_of_the_index(model):
    task = dpo_task(model, seed=3)
    again = dpo_task(model, seed=3)
    for index in (0, 5, 17):
        for a, b in zip(task.batch(index), again.batch(index), strict=True):
            assert torch.equal(a, b)
    inputs, targets, reference = task.batch(5)
    assert inputs.shape[0] == targets.shape[0] == 16 and reference.shape == (8, 2)
    assert not torch.equal(task.batch(5)[0], task.batch(6)[0])


def test_training_raises_the_validation_preference_accuracy_and_margin(tmp_path, model):
    task = dpo_task(model, seed=3, beta=0.5)
    before = task.evaluate(model, max_batches=10, autocast=contextlib.nullcontext)
    config = TrainConfig(max_steps=10, learning_rate=3e-3, eval_interval=10, eval_batches=10, device="cpu")
    result = Trainer(model.train(), task, config, gpt2_tokenizer(), tmp_path).train()
    after = result.metrics
    assert after["val_preference_accuracy"] > 0.9 > before["val_preference_accuracy"]
    assert after["val_reward_margin"] > before["val_reward_margin"] + 0.1
    assert after["val_loss"] < math.log(2) - 0.05


def test_preference_scores_with_and_without_a_reference(model, tok):
    pairs = [encode_preference(r, tok, CONFIG.context_length) for r in ({**ALPACA, "input": ""}, RAW)]
    reference = pair_logprobs(model, pairs, tok.eot_id)
    against_itself = preference_scores(model, pairs, reference, beta=0.1, pad_id=tok.eot_id)
    assert against_itself.margins.tolist() == [0.0, 0.0] and against_itself.accuracy == 0.0
    own = preference_scores(model, pairs, None, beta=0.1, pad_id=tok.eot_id)
    torch.testing.assert_close(own.margins, 0.1 * (own.logprobs[:, 0] - own.logprobs[:, 1]))
    assert own.accuracy == float((own.margins > 0).float().mean())
    with pytest.raises(ValueError, match="shape"):
        preference_scores(model, pairs, reference[:1], pad_id=tok.eot_id)
    with pytest.raises(EvaluationStopped):
        preference_scores(model, pairs, None, pad_id=tok.eot_id, batch_size=1, progress=lambda done, total: True)


def test_objective_refuses_a_reference_of_the_wrong_shape():
    pairs = synthetic_pairs(4, 0)
    with pytest.raises(ValueError, match="validation reference"):
        DPOObjective(pairs, pairs, torch.zeros(4, 2), torch.zeros(3, 2), batch_size=2)


def test_without_dropout_a_training_model_answers_as_in_eval_mode():
    torch.manual_seed(0)
    model = without_dropout(GPT(GPTConfig.preset("nano", dropout=0.5)))
    assert model.config.dropout == 0.5  # what later finetunes from its checkpoint start with
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    training = model.train()(idx)[0]
    assert torch.equal(training, model(idx)[0]) and torch.allclose(training, model.eval()(idx)[0], atol=1e-6)
