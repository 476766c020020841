"""EleutherAI's lm-evaluation-harness scores a served checkpoint through /v1/completions (its `local-completions`
model: prompts as token ids, `echo` and `logprobs` for loglikelihoods), on tasks made from the real data in
../shared/data, and its loglikelihoods are the model's own."""

import json
from dataclasses import replace

import pytest
import torch

from model import GPT, generate, gpt2_tokenizer
from tests.helpers import TINY_LM, add_checkpoint, deploy

CONTEXT = 256
EXAMPLES = 6
MULTIPLE_CHOICE = """task: sms_spam_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Message: {{{{text}}}}\\nThis message is"
doc_to_choice: ["ham", "spam"]
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
"""
GENERATE_UNTIL = """task: alpaca_answer
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Instruction: {{{{instruction}}}}\\nAnswer:"
doc_to_target: "{{{{output}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _tasks(folder, shared_data) -> None:
    """Two tasks on local files, from the SMS spam collection and the chapter-7 instruction data."""
    messages = []
    for line in (shared_data / "SMSSpamCollection.tsv").read_text(encoding="utf-8").splitlines()[:EXAMPLES]:
        label, text = line.split("\t", 1)
        messages.append({"text": text[:100], "label": int(label == "spam")})
    instructions = [{"instruction": r["instruction"][:100], "output": r["output"][:40]}
                    for r in json.loads((shared_data / "instruction-data.json").read_text())[:EXAMPLES]]
    for name, template, records in (("sms", MULTIPLE_CHOICE, messages), ("alpaca", GENERATE_UNTIL, instructions)):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        (folder / f"{name}.yaml").write_text(template.format(data=data))


def _own_loglikelihood(lm, context: str, continuation: str) -> float:
    """The model's log-probability of continuation after context, tokenized as the harness does (the context's
    trailing spaces go with the continuation; the pair encoded whole, the context alone)."""
    tokenizer = gpt2_tokenizer()
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, start = tokenizer.encode(context + continuation), len(tokenizer.encode(context))
    with torch.no_grad():
        logprobs = torch.log_softmax(lm(torch.tensor([whole]))[0][0], dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))


@pytest.fixture
def harness_env(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_lm_evaluation_harness_scores_a_served_checkpoint(api, live_server, shared_data, tmp_path, harness_env):
    import lm_eval
    from lm_eval.tasks import TaskManager

    torch.manual_seed(0)
    lm = GPT(replace(TINY_LM, context_length=CONTEXT)).eval()
    # the harness's tiktoken backend sends the model name it tokenizes with: the deployment is called that
    deploy(api, "gpt2", add_checkpoint(api, lm))
    _tasks(tmp_path, shared_data)
    results = lm_eval.simple_evaluate(
        model="local-completions", model_args={"base_url": f"{live_server}/v1/completions", "model": "gpt2",
                                               "tokenizer_backend": "tiktoken", "max_length": CONTEXT},
        tasks=["sms_spam_choice", "alpaca_answer"], batch_size=2, log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    choices = results["samples"]["sms_spam_choice"]
    assert len(choices) == EXAMPLES and 0 <= results["results"]["sms_spam_choice"]["acc,none"] <= 1
    for sample in choices:
        for (context, continuation), [(loglikelihood, _)] in zip(sample["arguments"], sample["resps"], strict=True):
            assert loglikelihood == pytest.approx(_own_loglikelihood(lm, context, continuation), abs=1e-4)
    answers = results["samples"]["alpaca_answer"]
    assert len(answers) == EXAMPLES and all(isinstance(s["resps"][0][0], str) for s in answers)
    # greedy answers: the served text is the library's greedy continuation, cut at the first newline
    tokenizer = gpt2_tokenizer()
    first = answers[0]
    prompt = tokenizer.encode(first["arguments"][0][0])
    expected = tokenizer.decode(generate(lm, torch.tensor([prompt]), 8)[0, len(prompt):].tolist())
    assert first["resps"][0][0] == expected.split("\n")[0]
