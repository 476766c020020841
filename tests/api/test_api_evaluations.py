"""Evaluations through the API, run by the real job runner in this process (test_service_flow runs one on a
Celery worker)."""

import json
import math
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from core.db import Database
from core.sealing import unseal
from core.tables import Checkpoint, Job
from model import (
    GPT,
    GPTClassifier,
    GPTConfig,
    balance_classes,
    encode_classification,
    encode_instruction,
    gpt2_tokenizer,
    read_classification_file,
    split_dataset,
)
from model.evaluation import JUDGE_PROMPT, classification_report, classify, judge_prompt
from model.instruction_data import instruction_collate
from tests.helpers import add_checkpoint, assert_error, chat_completion, deploy, recording_server, upload_corpus
from worker.runner import run

NANO = GPTConfig.preset("nano")
TEXT = b"Every effort moves you forward. " * 40 + "Caf\u00e9 \u2713 \u65e5\u672c\u8a9e.\n".encode()
SMS = b"ham\thello there\nspam\twin a prize now\nham\tsee you soon\nspam\tfree money\n"
INSTRUCTIONS = [{"instruction": "Give the number.", "input": "", "output": "85"},
                {"instruction": "Name a colour.", "input": "", "output": "Blue"},
                {"instruction": "Repeat the number.", "input": "85", "output": "85"},
                {"instruction": "Say hello.", "input": "", "output": "Hello there"}]


def run_job(api, job_id: str) -> None:
    run(api.app.state.services.settings, job_id, "test-worker")


def evaluate(api, **request) -> dict:
    response = api.post("/v1/evaluations", json=request)
    assert response.status_code == 201, response.text
    evaluation = response.json()
    assert evaluation["status"] == "queued" and evaluation["metrics"] is None
    run_job(api, evaluation["job_id"])
    evaluation = api.get(f"/v1/evaluations/{evaluation['id']}").json()
    assert evaluation["status"] == "succeeded", evaluation
    return evaluation


def trained_lm(tokens: list[int], steps: int = 30) -> GPT:
    torch.manual_seed(0)
    model = GPT(NANO)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.tensor([tokens[:64]]), torch.tensor([tokens[1:65]])
    for _ in range(steps):
        optimizer.zero_grad()
        model(x, y)[1].backward()
        optimizer.step()
    return model.eval()


def test_language_models_are_scored_alike_and_compared(api):
    corpus = upload_corpus(api, TEXT, "text.txt", "text")
    torch.manual_seed(0)
    untrained = add_checkpoint(api, GPT(NANO))
    trained = add_checkpoint(api, trained_lm(gpt2_tokenizer().encode(TEXT.decode())))
    before = evaluate(api, checkpoint_id=untrained, corpus_id=corpus, block_size=32)
    after = evaluate(api, checkpoint_id=trained, corpus_id=corpus, block_size=32)

    assert before["kind"] == "lm" and before["settings"] == {"block_size": 32, "stride": 16, "max_tokens": None,
                                                             "batch_size": 8}
    for evaluation in (before, after):
        m = evaluation["metrics"]
        assert m["perplexity"] == math.exp(m["loss"])
        assert m["bytes"] == len(TEXT) and m["tokens"] == api.get(f"/v1/corpora/{corpus}").json()["n_tokens"]
        assert evaluation["progress"]["step"] == evaluation["progress"]["total_steps"] > 0
    assert abs(before["metrics"]["bits_per_byte"] / before["metrics"]["uniform_bits_per_byte"] - 1) < 0.02
    assert after["metrics"]["bits_per_byte"] < 0.5 * before["metrics"]["bits_per_byte"]

    table = api.get("/v1/evaluations/compare", params={"corpus_id": corpus}).json()
    assert [row["evaluation_id"] for row in table["rows"]] == [before["id"], after["id"]]
    assert table["best"]["bits_per_byte"] == table["best"]["loss"] == after["id"]
    assert table["comparable"] is True and table["notes"] == []
    assert table["metrics"][:3] == ["loss", "perplexity", "bits_per_byte"] and "tokens" in table["metrics"]
    by_ids = api.get("/v1/evaluations/compare", params={"ids": f"{after['id']},{before['id']}"}).json()
    assert [row["checkpoint_id"] for row in by_ids["rows"]] == [trained, untrained]
    listed = api.get("/v1/evaluations", params={"checkpoint_id": trained}).json()["data"]
    assert [e["id"] for e in listed] == [after["id"]]

    other_window = evaluate(api, checkpoint_id=trained, corpus_id=corpus, block_size=16, max_tokens=100)
    mixed = api.get("/v1/evaluations/compare", params={"ids": f"{after['id']},{other_window['id']}"}).json()
    assert mixed["comparable"] is False
    assert any("block_size" in note for note in mixed["notes"]) and any("max_tokens" in n for n in mixed["notes"])


def test_sms_spam_test_split_matches_the_library_to_the_last_example(api, shared_data):
    """The book's split (balanced, 70/10/20, seed 123) scored by the job and by model.evaluation as
    bench/bench_spam.py scores it: the same prediction for every one of the 300 test texts."""
    tokenizer = gpt2_tokenizer()
    data = read_classification_file(shared_data / "SMSSpamCollection.tsv", label_names=["ham", "spam"])
    train_set, _, test_set = split_dataset(balance_classes(data, seed=123), (0.7, 0.1, 0.2), seed=123)
    train_ids, train_lengths = encode_classification(train_set.texts, tokenizer)
    max_length = train_ids.shape[1]
    torch.manual_seed(0)
    model = GPTClassifier(NANO, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    labels = torch.tensor(train_set.labels)
    for i in range(0, 320, 16):  # a little training, so the predictions are not all one class
        optimizer.zero_grad()
        rows = slice(i, i + 16)
        model(train_ids[rows], train_lengths[rows], labels[rows])[1].backward()
        optimizer.step()
    model.eval()
    test_ids, test_lengths = encode_classification(test_set.texts, tokenizer, max_length=max_length)
    probabilities = classify(model, test_ids, test_lengths, batch_size=64)
    library = classification_report(test_set.labels, probabilities, ["ham", "spam"])
    assert 0.5 < library["accuracy"] < 1.0

    tsv = "".join(f"{['ham', 'spam'][label]}\t{text}\n" for text, label in zip(test_set.texts, test_set.labels,
                                                                                  strict=True))
    corpus = upload_corpus(api, tsv.encode(), "test.tsv", "classification")
    checkpoint = add_checkpoint(api, model, label_names=["ham", "spam"])
    evaluation = evaluate(api, checkpoint_id=checkpoint, corpus_id=corpus, max_length=max_length, batch_size=64,
                          worst_examples=5)
    m, d = evaluation["metrics"], evaluation["details"]
    assert (m["accuracy"], m["correct"], m["examples"]) == (library["accuracy"], library["correct"], 300)
    assert d["confusion_matrix"] == library["confusion_matrix"] and d["per_class"] == library["per_class"]
    assert m["macro_f1"] == library["macro_f1"]
    examples = api.get(f"/v1/evaluations/{evaluation['id']}/examples",
                       params={"order": "position", "limit": 1000}).json()
    assert [e["data"]["predicted"] for e in examples["data"]] == \
        [["ham", "spam"][k] for k in probabilities.argmax(-1).tolist()]
    assert [e["data"]["text"] for e in examples["data"]] == test_set.texts
    worst = d["worst_examples"]
    assert len(worst) == 5 and [w["score"] for w in worst] == sorted(w["score"] for w in worst)
    first_page = api.get(f"/v1/evaluations/{evaluation['id']}/examples", params={"limit": 5}).json()
    assert [e["position"] for e in first_page["data"]] == [w["position"] for w in worst] and first_page["has_more"]
    assert all(abs(sum(w["probabilities"].values()) - 1) < 1e-5 for w in worst)


def test_classifier_labels_it_does_not_know_are_refused_before_a_job(api):
    checkpoint = add_checkpoint(api, GPTClassifier(NANO, 2), label_names=["ham", "spam"])
    corpus = upload_corpus(api, SMS + b"eggs\tgreen eggs\n", "sms.tsv", "classification")
    jobs_before = api.get("/v1/jobs").json()["data"]
    assert_error(api.post("/v1/evaluations", json={"checkpoint_id": checkpoint, "corpus_id": corpus}), 422,
                 "['eggs']", "does not know", param="corpus_id")
    assert api.get("/v1/jobs").json()["data"] == jobs_before


def judge_model() -> GPT:
    """A nano instruction model that answers every prompt with 85: a judge with a fixed opinion."""
    tokenizer = gpt2_tokenizer()
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("nano", context_length=256))
    # it answers the held-out instructions, and is asked to judge those answers
    records = [{**r, "output": "85"} for r in INSTRUCTIONS]
    records += [{"instruction": judge_prompt(r, "85"), "input": "", "output": "85"} for r in INSTRUCTIONS]
    x, y = instruction_collate([encode_instruction(r, tokenizer) for r in records], mask_prompt=True)
    answers = y != -100  # the loss of a masked prompt is 0: the LM head runs on the answers only
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        optimizer.zero_grad()
        logits = F.linear(model.hidden_states(x)[answers], model.output_weight)
        F.cross_entropy(logits, y[answers]).backward()
        optimizer.step()
    return model.eval()


def allow_judges_at(api, monkeypatch, *urls: str) -> None:
    """The server's allowed judge hosts: these local servers' host:port."""
    monkeypatch.setattr(api.app.state.services.settings, "judge_allowed_hosts",
                        [url.removeprefix("http://") for url in urls])


def job_spec(api, job_id: str) -> dict:
    """The job's spec as the database holds it."""
    database = Database(api.app.state.services.settings.sqlalchemy_url)
    with database.session() as session:
        spec = session.get(Job, job_id).spec
    database.dispose()
    return spec


def test_instruction_model_answers_are_scored_and_judged_by_a_live_chat_endpoint(api, live_server, monkeypatch):
    """The judge is this service's own /v1/chat/completions serving an instruction-tuned checkpoint: on a
    loopback address, allowed by the server's judge_allowed_hosts."""
    allow_judges_at(api, monkeypatch, live_server)
    model = judge_model()
    checkpoint = add_checkpoint(api, model, prompt_format="alpaca")
    assert deploy(api, "judge", checkpoint)["state"] == "ready"
    corpus = upload_corpus(api, json.dumps(INSTRUCTIONS).encode(), "held-out.json", "instruction")
    evaluation = evaluate(api, checkpoint_id=checkpoint, corpus_id=corpus, max_new_tokens=8,
                          judge={"url": f"{live_server}/v1", "model": "judge", "api_key": "sk-judge-secret"})

    m, d = evaluation["metrics"], evaluation["details"]
    examples = api.get(f"/v1/evaluations/{evaluation['id']}/examples", params={"order": "position"}).json()["data"]
    assert [e["data"]["response"] for e in examples] == ["85"] * 4
    assert [e["data"]["reference"] for e in examples] == [r["output"] for r in INSTRUCTIONS]
    assert m["exact_match"] == 0.5 and m["token_f1"] == 0.5 and m["examples"] == 4
    assert m["response_loss"] > 0 and m["response_perplexity"] == math.exp(m["response_loss"])
    assert d["judge"] == {"url": f"{live_server}/v1", "model": "judge", "prompt": JUDGE_PROMPT, "scored": 4,
                          "unscored": 0}
    assert m["judge_score"] == 85 and [e["data"]["judge_score"] for e in examples] == [85] * 4
    assert evaluation["settings"]["judge"]["prompt"] == JUDGE_PROMPT
    job = api.get(f"/v1/jobs/{evaluation['job_id']}").json()
    assert job["spec"]["judge"]["api_key"] == "(set)" and "sk-judge-secret" not in json.dumps(evaluation)
    assert "sk-judge-secret" not in json.dumps(job_spec(api, job["id"]))
    assert job["links"] == {"evaluation": f"/v1/evaluations?job_id={job['id']}"}


def test_the_judge_key_is_stored_encrypted_and_sent_by_the_worker(api, monkeypatch):
    checkpoint = add_checkpoint(api, GPT(NANO), prompt_format="alpaca")
    corpus = upload_corpus(api, json.dumps(INSTRUCTIONS[:2]).encode(), "i.json", "instruction")
    with recording_server(chat_completion("85")) as (url, received):
        allow_judges_at(api, monkeypatch, url)
        evaluation = evaluate(api, checkpoint_id=checkpoint, corpus_id=corpus, max_new_tokens=2,
                              judge={"url": f"{url}/v1", "model": "judge", "api_key": "sk-judge-secret"})
    assert evaluation["metrics"]["judge_score"] == 85
    assert [r["Authorization"] for r in received] == ["Bearer sk-judge-secret"] * 2
    sealed = job_spec(api, evaluation["job_id"])["judge"]["api_key"]
    assert "sk-judge-secret" not in sealed and unseal(api.app.state.services.settings, sealed) == "sk-judge-secret"


def test_the_worker_checks_the_judge_again_before_it_connects(api, monkeypatch):
    """A judge the server allowed when the evaluation was created but no longer does is not called."""
    checkpoint = add_checkpoint(api, GPT(NANO), prompt_format="alpaca")
    corpus = upload_corpus(api, json.dumps(INSTRUCTIONS[:2]).encode(), "i.json", "instruction")
    with recording_server(chat_completion("85")) as (url, received):
        allow_judges_at(api, monkeypatch, url)
        response = api.post("/v1/evaluations", json={"checkpoint_id": checkpoint, "corpus_id": corpus,
                                                     "max_new_tokens": 2, "judge": {"url": f"{url}/v1", "model": "m"}})
        assert response.status_code == 201, response.text
        allow_judges_at(api, monkeypatch)
        run_job(api, response.json()["job_id"])
    evaluation = api.get(f"/v1/evaluations/{response.json()['id']}").json()
    assert "is refused" in evaluation["details"]["judge"]["error"] and received == []
    assert evaluation["metrics"]["examples"] == 2 and "judge_score" not in evaluation["metrics"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8000/v1", "http://10.0.0.1/v1", "http://169.254.169.254/latest", "http://[::1]:8000/v1",
    "http://localhost:8000/v1",  # a name that resolves to loopback
    "http://[::ffff:127.0.0.1]/v1", "https://judge.example/v1?api-version=1", "https://user:pw@judge.example/v1",
    "https://judge.example/v1#x",
])
def test_judges_on_the_server_s_own_network_are_refused_before_a_job(api, url):
    checkpoint = add_checkpoint(api, GPT(NANO), prompt_format="alpaca")
    corpus = upload_corpus(api, json.dumps(INSTRUCTIONS[:2]).encode(), "i.json", "instruction")
    assert_error(api.post("/v1/evaluations", json={"checkpoint_id": checkpoint, "corpus_id": corpus,
                                                   "judge": {"url": url, "model": "m"}}), 422, "refused",
                 param="judge.url")
    assert api.get("/v1/jobs").json()["data"] == []


def test_an_unreachable_judge_keeps_the_other_numbers(api, monkeypatch):
    allow_judges_at(api, monkeypatch, "http://127.0.0.1:9")
    checkpoint = add_checkpoint(api, GPT(NANO), prompt_format="alpaca")
    corpus = upload_corpus(api, json.dumps(INSTRUCTIONS[:2]).encode(), "i.json", "instruction")
    evaluation = evaluate(api, checkpoint_id=checkpoint, corpus_id=corpus, max_new_tokens=2,
                          judge={"url": "http://127.0.0.1:9/v1", "model": "nobody", "timeout_s": 2})
    assert "could not be reached" in evaluation["details"]["judge"]["error"]
    assert "judge_score" not in evaluation["metrics"] and evaluation["metrics"]["examples"] == 2


@pytest.fixture
def ids(api) -> dict:
    return {"text": upload_corpus(api, TEXT, "t.txt", "text"),
            "classification": upload_corpus(api, SMS, "sms.tsv", "classification"),
            "instruction": upload_corpus(api, json.dumps(INSTRUCTIONS).encode(), "i.json", "instruction"),
            "lm": add_checkpoint(api, GPT(NANO)),
            "classifier": add_checkpoint(api, GPTClassifier(NANO, 2), label_names=["ham", "spam"])}


@pytest.mark.parametrize("request_of, words, param", [
    (lambda i: {"checkpoint_id": "ckpt_nope", "corpus_id": i["text"]}, ["no checkpoint"], "checkpoint_id"),
    (lambda i: {"checkpoint_id": i["lm"], "corpus_id": "corpus_nope"}, ["no corpus"], "corpus_id"),
    (lambda i: {"checkpoint_id": i["classifier"], "corpus_id": i["text"]}, ["is a classifier"], "corpus_id"),
    (lambda i: {"checkpoint_id": i["lm"], "corpus_id": i["classification"]}, ["classifier checkpoints"],
     "corpus_id"),
    (lambda i: {"checkpoint_id": i["lm"], "corpus_id": i["instruction"]}, ["not instruction-finetuned"],
     "corpus_id"),
    (lambda i: {"checkpoint_id": i["lm"], "corpus_id": i["text"], "block_size": 129}, ["context length 128"],
     "block_size"),
    (lambda i: {"checkpoint_id": i["lm"], "corpus_id": i["text"], "block_size": 16, "stride": 17},
     ["exceeds block_size"], "stride"),
    (lambda i: {"checkpoint_id": i["lm"], "corpus_id": i["text"], "max_length": 10}, ["max_length applies"],
     "max_length"),
    (lambda i: {"checkpoint_id": i["classifier"], "corpus_id": i["classification"], "judge": {
        "url": "http://localhost:1/v1", "model": "m"}}, ["judge applies to instruct"], "judge"),
    (lambda i: {"checkpoint_id": i["lm"], "corpus_id": i["text"], "judge": {"url": "ftp://x", "model": "m"}},
     ["URL"], "judge.url"),
    (lambda i: {"checkpoint_id": i["lm"], "corpus_id": i["text"], "block_size": 0}, ["greater than"], "block_size"),
    (lambda i: {"checkpoint_id": i["lm"], "corpus_id": i["text"], "surprise": 1}, ["Extra inputs"], "surprise"),
])
def test_bad_requests_are_named_4xx_and_queue_nothing(api, ids, request_of, words, param):
    assert_error(api.post("/v1/evaluations", json=request_of(ids)), 422, *words, param=param)
    assert api.get("/v1/evaluations").json()["data"] == []


def test_lookups_compare_and_jobs_api_errors(api, ids):
    assert_error(api.get("/v1/evaluations/eval_nope"), 404, "eval_nope")
    assert_error(api.get("/v1/evaluations/eval_nope/examples"), 404, "eval_nope")
    assert_error(api.get("/v1/evaluations/compare"), 422, "either ids", param="ids")
    assert_error(api.get("/v1/evaluations/compare", params={"ids": ",,"}), 422, "between 1 and", param="ids")
    assert_error(api.get("/v1/evaluations/compare", params={"ids": "eval_a,eval_b"}), 404, "eval_a, eval_b")
    assert_error(api.get("/v1/evaluations/compare", params={"corpus_id": ids["text"]}), 404, "no finished")
    assert_error(api.post("/v1/jobs", json={"type": "evaluate", "corpus_id": ids["text"]}), 422, param="type")
    assert_error(api.get("/v1/evaluations", params={"kind": "poetry"}), 422, param="kind")


def test_cancel_a_queued_evaluation_and_delete_its_checkpoint_after(api, ids):
    evaluation = api.post("/v1/evaluations", json={"checkpoint_id": ids["lm"], "corpus_id": ids["text"]}).json()
    assert_error(api.delete(f"/v1/checkpoints/{ids['lm']}"), 409, "in use")
    cancelled = api.post(f"/v1/evaluations/{evaluation['id']}/cancel").json()
    assert cancelled["status"] == "cancelled"
    run_job(api, evaluation["job_id"])  # a cancelled job is not run
    assert api.get(f"/v1/evaluations/{evaluation['id']}").json()["metrics"] is None
    assert_error(api.post(f"/v1/evaluations/{evaluation['id']}/cancel"), 409, "already ended")

    done = evaluate(api, checkpoint_id=ids["lm"], corpus_id=ids["text"], block_size=32)
    assert api.delete(f"/v1/checkpoints/{ids['lm']}").status_code == 200
    kept = api.get(f"/v1/evaluations/{done['id']}").json()
    assert kept["checkpoint_id"] is None and kept["metrics"] == done["metrics"]  # the record outlives the weights


def test_a_running_evaluation_stops_when_cancelled(api, shared_data):
    corpus = upload_corpus(api, (shared_data / "tinyshakespeare.txt").read_bytes(), "shakespeare.txt", "text")
    evaluation = api.post("/v1/evaluations", json={"checkpoint_id": add_checkpoint(api, GPT(NANO)),
                                                   "corpus_id": corpus, "block_size": 32, "stride": 32,
                                                   "batch_size": 1}).json()
    worker = threading.Thread(target=run_job, args=(api, evaluation["job_id"]))
    worker.start()
    deadline = time.monotonic() + 60
    while api.get(f"/v1/evaluations/{evaluation['id']}").json()["progress"]["step"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    api.post(f"/v1/evaluations/{evaluation['id']}/cancel")
    worker.join(60)
    ended = api.get(f"/v1/evaluations/{evaluation['id']}").json()
    assert ended["status"] == "cancelled" and ended["metrics"] is None
    assert ended["progress"]["step"] < ended["progress"]["total_steps"]


def test_a_deleted_checkpoint_fails_its_queued_evaluation_clearly(api, ids):
    evaluation = api.post("/v1/evaluations", json={"checkpoint_id": ids["lm"], "corpus_id": ids["text"]}).json()
    database = Database(api.app.state.services.settings.sqlalchemy_url)
    with database.session() as session:  # as if deleted by hand, under the API's guard
        session.delete(session.get(Checkpoint, ids["lm"]))
    database.dispose()
    run_job(api, evaluation["job_id"])
    failed = api.get(f"/v1/evaluations/{evaluation['id']}").json()
    assert failed["status"] == "failed" and "checkpoint was deleted" in failed["error"]


def test_bits_per_byte_counts_every_byte_of_the_corpus(api):
    """bits per byte = total nats / ln 2 / bytes of the file: comparable across tokenizers."""
    corpus = upload_corpus(api, TEXT, "text.txt", "text")
    evaluation = evaluate(api, checkpoint_id=add_checkpoint(api, GPT(NANO)), corpus_id=corpus, block_size=64)
    m = evaluation["metrics"]
    assert m["bits_per_byte"] == pytest.approx(m["loss"] * m["tokens"] / math.log(2) / len(TEXT), rel=1e-12)
    assert np.isclose(m["uniform_bits_per_byte"], m["tokens"] * math.log2(50257) / len(TEXT))
