"""The jobs API without a worker: a submitted job's Celery message waits in the broker folder."""

import json

import pytest

from tests.helpers import assert_error, lenient, upload_corpus

NANO_CONFIG = {"vocab_size": 50257, "context_length": 128, "n_layer": 2, "n_head": 4, "n_embd": 64, "dropout": 0.0,
               "qkv_bias": True, "bias": True, "layer_norm_eps": 1e-5,
               "tie_embeddings": True, "position": "learned", "rope_theta": 10000.0, "rope_scaling": None,
               "norm": "layernorm", "mlp": "gelu", "mlp_hidden": None, "n_kv_head": None, "qk_norm": False}
SMS = b"ham\thello there\nspam\twin a prize now\nham\tsee you soon\nspam\tfree money\n"
INSTRUCTIONS = json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}] * 4).encode()


def readme_job(corpus_id: str, /, **changes) -> dict:
    """The README's pretraining request, with changes."""
    return {"type": "pretrain", "corpus_id": corpus_id, "model": {"preset": "nano"}, "tokenizer": "gpt2",
            "hyperparameters": {"max_steps": 200, "batch_size": 8, "learning_rate": 0.0006}, "seed": 1, **changes}


def insert_checkpoint(api, task: str = "lm", model_config: dict | None = None) -> str:
    """A checkpoint row written straight into the database (no files: no worker will read it here)."""
    from core.db import Database, new_id
    from core.tables import Checkpoint

    database = Database(api.app.state.services.settings.sqlalchemy_url)
    checkpoint_id = new_id("ckpt")
    try:
        with database.session() as session:
            session.add(Checkpoint(id=checkpoint_id, step=10, path=f"checkpoints/{checkpoint_id}", size_bytes=1,
                                   task=task, label_names=["ham", "spam"] if task == "classifier" else None,
                                   model_config=dict(model_config or NANO_CONFIG), tokenizer_type="gpt2",
                                   metrics={}))
    finally:
        database.dispose()
    return checkpoint_id



def assert_no_jobs(api) -> None:
    assert api.get("/v1/jobs").json() == {"object": "list", "data": [], "has_more": False}



@pytest.fixture
def text_corpus(api) -> str:
    return upload_corpus(api, b"every effort moves you\n" * 40, "the-text.txt", "text")


def test_submit_readme_pretrain_job(api, text_corpus, tmp_path):
    response = api.post("/v1/jobs", json=readme_job(text_corpus))
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["id"].startswith("job_") and job["object"] == "job"
    assert (job["type"], job["status"], job["corpus_id"], job["seed"]) == ("pretrain", "queued", text_corpus, 1)
    assert job["progress"] == {"step": 0, "total_steps": 200, "tokens_seen": 0, "tokens_per_s": None, "eta_s": None,
                               "train_loss": None, "val_loss": None}
    assert job["error"] is None and job["cancel_requested"] is False and job["attempts"] == 0
    assert job["started_at"] is None and job["finished_at"] is None and job["created_at"]
    assert job["validation_corpus_id"] is None and job["base_checkpoint_id"] is None and job["name"] is None
    spec = job["spec"]
    assert spec["model_config"] == NANO_CONFIG
    assert spec["model"] == {"preset": "nano", "n_layer": None, "n_head": None, "n_embd": None,
                             "context_length": None, "dropout": None, "qkv_bias": None,
                             "tie_embeddings": None, "position": None, "rope_theta": None, "norm": None,
                             "mlp": None, "mlp_hidden": None, "n_kv_head": None, "qk_norm": None}
    assert spec["tokenizer"] == "gpt2" and spec["lora"] is None and spec["validation_fraction"] == 0.1
    hyper = spec["hyperparameters"]
    assert (hyper["max_steps"], hyper["batch_size"], hyper["learning_rate"]) == (200, 8, 0.0006)
    # the defaults of what the request left out are filled in
    assert hyper["warmup_steps"] == 0 and hyper["weight_decay"] == 0.1 and hyper["grad_clip"] == 1.0
    assert hyper["eval_interval"] == 50 and hyper["checkpoint_interval"] == 100 and hyper["compile"] is False
    assert hyper["block_size"] is None and hyper["min_learning_rate"] is None
    assert api.get(f"/v1/jobs/{job['id']}").json() == job
    # the Celery message waits in the broker folder for a worker
    messages = [m.read_text() for m in (tmp_path / "data" / "broker").glob("*.msg")]
    assert len(messages) == 1 and job["id"] in messages[0]


def test_defaults_of_a_minimal_request(api, text_corpus):
    job = api.post("/v1/jobs", json={"type": "pretrain", "corpus_id": text_corpus, "name": "smallest"}).json()
    assert job["name"] == "smallest" and job["spec"]["model"]["preset"] == "nano"
    assert job["spec"]["tokenizer"] == "gpt2" and job["spec"]["model_config"] == NANO_CONFIG
    assert job["progress"]["total_steps"] == 200 and job["seed"] == 1


def test_list_filters_and_pages(api, text_corpus):
    pretrains = [api.post("/v1/jobs", json=readme_job(text_corpus, seed=i)).json()["id"] for i in range(5)]
    classification = upload_corpus(api, SMS, "sms.tsv", "classification")
    finetune = api.post("/v1/jobs", json={"type": "finetune_classifier", "corpus_id": classification,
                                          "base_checkpoint_id": insert_checkpoint(api)})
    assert finetune.status_code == 201, finetune.text
    finetune = finetune.json()
    assert finetune["spec"]["trainable_blocks"] == 1 and "model_config" not in finetune["spec"]
    assert api.post(f"/v1/jobs/{pretrains[1]}/cancel").status_code == 200

    everything = api.get("/v1/jobs").json()
    assert [j["id"] for j in everything["data"]] == [finetune["id"], *pretrains[::-1]]
    assert everything["has_more"] is False and everything["object"] == "list"

    def ids(**params) -> list[str]:
        return [j["id"] for j in api.get("/v1/jobs", params=params).json()["data"]]

    assert ids(status="cancelled") == [pretrains[1]]
    assert ids(status="queued", type="pretrain") == [pretrains[4], pretrains[3], pretrains[2], pretrains[0]]
    assert ids(type="finetune_classifier") == [finetune["id"]]
    assert ids(type="finetune_instruct") == [] and ids(status="running") == []

    page = api.get("/v1/jobs", params={"type": "pretrain", "limit": 2}).json()
    assert [j["id"] for j in page["data"]] == pretrains[::-1][:2] and page["has_more"] is True
    page = api.get("/v1/jobs", params={"type": "pretrain", "limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in page["data"]] == pretrains[::-1][2:4] and page["has_more"] is True
    page = api.get("/v1/jobs", params={"type": "pretrain", "limit": 2, "after": page["data"][-1]["id"]}).json()
    assert [j["id"] for j in page["data"]] == [pretrains[0]] and page["has_more"] is False
    page = api.get("/v1/jobs", params={"limit": 6}).json()
    assert len(page["data"]) == 6 and page["has_more"] is False


def test_list_parameters_are_checked(api):
    assert_error(api.get("/v1/jobs", params={"status": "sleeping"}), 422, "status", param="status")
    assert_error(api.get("/v1/jobs", params={"type": "distill"}), 422, "type", param="type")
    assert_error(api.get("/v1/jobs", params={"limit": 0}), 422, "limit", param="limit")
    assert_error(api.get("/v1/jobs", params={"limit": 1001}), 422, "limit", param="limit")


def test_events_and_metrics_of_a_queued_job(api, text_corpus):
    job = api.post("/v1/jobs", json=readme_job(text_corpus)).json()
    events = api.get(f"/v1/jobs/{job['id']}/events").json()
    assert events["object"] == "list" and events["has_more"] is False
    [queued] = events["data"]
    assert queued["object"] == "job.event" and queued["type"] == "status" and queued["message"] == "job queued"
    assert queued["data"] == {"status": "queued"} and queued["level"] == "info" and isinstance(queued["id"], int)
    assert api.get(f"/v1/jobs/{job['id']}/events", params={"after": queued["id"]}).json()["data"] == []

    metrics = api.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "train_loss"})
    assert metrics.status_code == 200, metrics.text
    assert metrics.json() == {"object": "metrics", "job_id": job["id"], "name": "train_loss", "data": [],
                              "has_more": False}
    assert_error(api.get(f"/v1/jobs/{job['id']}/metrics"), 422, "name", "Field required", param="name")
    assert_error(api.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "x", "since_step": -1}), 422,
                 "since_step", param="since_step")
    assert_error(api.get(f"/v1/jobs/{job['id']}/events", params={"limit": 0}), 422, "limit", param="limit")


def test_metrics_come_in_pages(api, text_corpus):
    from sqlalchemy import insert

    from core.tables import Metric

    job = api.post("/v1/jobs", json=readme_job(text_corpus)).json()
    with api.app.state.services.database.session() as session:
        session.execute(insert(Metric), [{"job_id": job["id"], "name": "train_loss", "step": step, "value": 1 / step}
                                         for step in range(1, 2501)])
    url = f"/v1/jobs/{job['id']}/metrics"
    first = api.get(url, params={"name": "train_loss"}).json()
    assert len(first["data"]) == 1000 and first["has_more"] and first["data"][-1]["step"] == 1000
    steps, since = [], 1
    while True:
        page = api.get(url, params={"name": "train_loss", "since_step": since, "limit": 900}).json()
        steps += [p["step"] for p in page["data"]]
        if not page["has_more"]:
            break
        since = page["data"][-1]["step"] + 1
    assert steps == list(range(1, 2501))
    assert_error(api.get(url, params={"name": "train_loss", "limit": 10_001}), 422, "limit", param="limit")


INVALID = [  # (id, changes to the README request, or a function of the fixture's ids; words; param or None)
    ("n_embd_not_divisible", {"model": {"preset": "nano", "n_embd": 30, "n_head": 4}},
     ("n_embd (30) must be divisible by n_head (4)",), "model"),
    ("unknown_preset", {"model": {"preset": "gpt5"}}, ("unknown preset 'gpt5'", "nano"), "model"),
    ("negative_learning_rate", {"hyperparameters": {"learning_rate": -0.001}}, ("greater than 0",),
     "hyperparameters.learning_rate"),
    ("zero_max_steps", {"hyperparameters": {"max_steps": 0}}, ("greater than or equal to 1",),
     "hyperparameters.max_steps"),
    ("min_lr_above_lr", {"hyperparameters": {"learning_rate": 0.001, "min_learning_rate": 0.01}},
     ("min_learning_rate must not exceed learning_rate",), "hyperparameters"),
    ("unknown_hyperparameter", {"hyperparameters": {"max_steps": 10, "lr": 0.1}}, ("hyperparameters.lr", "Extra"),
     "hyperparameters.lr"),
    ("unknown_top_level_key", {"epochs": 3}, ("epochs", "Extra inputs are not permitted"), "epochs"),
    ("missing_corpus_id", {"corpus_id": None}, ("corpus_id", "Field required"), "corpus_id"),
    ("corpus_does_not_exist", {"corpus_id": "corpus_nope"}, ("no corpus with id 'corpus_nope'",), "corpus_id"),
    ("corpus_of_wrong_kind", lambda ids: {"corpus_id": ids["classification"]},
     ("is a classification corpus", "needs a text corpus"), "corpus_id"),
    ("block_size_beyond_context", {"hyperparameters": {"block_size": 1000}},
     ("block_size 1000 exceeds the model's context length 128",), "hyperparameters.block_size"),
    ("lora_on_pretrain", {"lora": {"rank": 4}}, ("lora is for finetunes",), None),
    ("finetune_without_base", lambda ids: {"type": "finetune_classifier", "corpus_id": ids["classification"],
                                           "model": None, "tokenizer": None},
     ("finetune_classifier needs base_checkpoint_id",), None),
    ("finetune_from_missing_checkpoint", lambda ids: {
        "type": "finetune_classifier", "corpus_id": ids["classification"], "base_checkpoint_id": "ckpt_nope",
        "model": None, "tokenizer": None}, ("no checkpoint with id 'ckpt_nope'",), "base_checkpoint_id"),
    ("finetune_from_classifier_checkpoint", lambda ids: {
        "type": "finetune_classifier", "corpus_id": ids["classification"], "base_checkpoint_id": ids["classifier"],
        "model": None, "tokenizer": None}, ("is a classifier checkpoint", "task lm"), "base_checkpoint_id"),
    ("instruct_from_classifier_checkpoint", lambda ids: {
        "type": "finetune_instruct", "corpus_id": ids["instruction"], "base_checkpoint_id": ids["classifier"],
        "model": None, "tokenizer": None}, ("is a classifier checkpoint",), "base_checkpoint_id"),
    ("model_on_finetune", lambda ids: {"type": "finetune_classifier", "corpus_id": ids["classification"],
                                       "base_checkpoint_id": ids["lm"], "tokenizer": None},
     ("drop model and tokenizer",), None),
    ("trainable_blocks_beyond_base", lambda ids: {
        "type": "finetune_classifier", "corpus_id": ids["classification"], "base_checkpoint_id": ids["lm"],
        "model": None, "tokenizer": None, "trainable_blocks": 3}, ("trainable_blocks 3 exceeds", "2 blocks"),
     "trainable_blocks"),
    ("max_length_beyond_base_context", lambda ids: {
        "type": "finetune_instruct", "corpus_id": ids["instruction"], "base_checkpoint_id": ids["lm"],
        "model": None, "tokenizer": None, "hyperparameters": {"max_length": 129}},
     ("max_length 129 exceeds", "128"), "hyperparameters.max_length"),
    ("unknown_type", {"type": "distill"}, ("type",), "type"),
    ("negative_seed", {"seed": -1}, ("seed",), "seed"),
    ("bad_lora_target", lambda ids: {"type": "finetune_instruct", "corpus_id": ids["instruction"],
                                     "base_checkpoint_id": ids["lm"], "model": None, "tokenizer": None,
                                     "lora": {"targets": ["wte"]}}, ("lora.targets",), None),
    ("continued_pretraining_with_a_model", lambda ids: {"base_checkpoint_id": ids["lm"], "tokenizer": None},
     ("continued pretraining keeps its base checkpoint's model",), None),
    ("continued_pretraining_of_a_classifier", lambda ids: {"base_checkpoint_id": ids["classifier"], "model": None,
                                                          "tokenizer": None},
     ("is a classifier checkpoint",), "base_checkpoint_id"),
    ("steps_and_epochs", {"hyperparameters": {"max_steps": 10, "epochs": 2}}, ("max_steps or epochs",), None),
    ("no_epochs", {"hyperparameters": {"epochs": 0}}, ("epochs",), None),
    ("adapter_only_without_lora", lambda ids: {"type": "finetune_instruct", "corpus_id": ids["instruction"],
                                               "base_checkpoint_id": ids["lm"], "model": None, "tokenizer": None,
                                               "adapter_only": True}, ("adapter_only", "with lora"), None),
    ("adapter_only_classifier", lambda ids: {"type": "finetune_classifier", "corpus_id": ids["classification"],
                                             "base_checkpoint_id": ids["lm"], "model": None, "tokenizer": None,
                                             "lora": {}, "adapter_only": True}, ("finetune_instruct",), None),
    ("devices_not_dividing_the_accumulation", {"devices": 2},
     ("grad_accum_steps (1) must be a multiple of the number of devices (2)",), None),
    ("no_devices", {"devices": 0}, ("devices: Input should be greater than or equal to 1",), "devices"),
    ("devices_by_name", {"devices": "all"}, ("devices",), "devices"),
    ("nodes_not_dividing_the_accumulation", {"nodes": 2},
     ("grad_accum_steps (1) must be a multiple of the number of devices (2)",), None),
    ("nodes_with_devices_auto", {"nodes": 2, "devices": "auto"}, ("several nodes", "not auto"), None),
    ("no_nodes", {"nodes": 0}, ("nodes: Input should be greater than or equal to 1",), "nodes"),
    ("nodes_past_the_limit", {"nodes": 65}, ("nodes",), "nodes"),
]


@pytest.fixture
def ids(api, text_corpus) -> dict:
    return {"text": text_corpus, "classification": upload_corpus(api, SMS, "sms.tsv", "classification"),
            "instruction": upload_corpus(api, INSTRUCTIONS, "i.json", "instruction"),
            "lm": insert_checkpoint(api), "classifier": insert_checkpoint(api, "classifier")}


@pytest.mark.parametrize("changes, words, param", [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_requests_are_422_and_create_no_job(api, ids, changes, words, param):
    body = readme_job(ids["text"], **(changes(ids) if callable(changes) else changes))
    body = {key: value for key, value in body.items() if value is not None}
    assert_error(api.post("/v1/jobs", json=body), 422, *words, param=param)
    assert_no_jobs(api)


def test_bpe_vocabulary_too_small_is_422(api, text_corpus):
    error = assert_error(api.post("/v1/jobs", json=readme_job(text_corpus, tokenizer={"type": "bpe",
                                                                                       "vocab_size": 100})), 422)
    assert any(d["param"].endswith("vocab_size") and "257" in d["message"] for d in error["details"]), error
    assert_no_jobs(api)
    # a big enough one is accepted, and the model is sized for it
    job = api.post("/v1/jobs", json=readme_job(text_corpus, tokenizer={"type": "bpe", "vocab_size": 300})).json()
    assert job["spec"]["model_config"]["vocab_size"] == 300 and job["spec"]["tokenizer"]["vocab_size"] == 300


def test_bpe_vocabulary_too_small_message_names_vocab_size(api, text_corpus):
    error = assert_error(api.post("/v1/jobs", json=readme_job(text_corpus, tokenizer={"type": "bpe",
                                                                                       "vocab_size": 100})), 422)
    assert "vocab_size" in error["message"] and "literal" not in error["param"], error


def test_body_that_is_not_json(api, text_corpus):
    response = api.post("/v1/jobs", content=b'{"type": "pretrain", oops', headers={"content-type": "application/json"})
    assert_error(response, 422, "JSON")
    response = api.post("/v1/jobs", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_error(response, 422, "body")
    assert_no_jobs(api)


def test_body_that_is_not_json_names_the_body(api):
    response = api.post("/v1/jobs", content=b'{"type": "pretrain", oops', headers={"content-type": "application/json"})
    error = assert_error(response, 422, "JSON")
    assert error["param"] in ("body", None), error


def test_wrong_content_type(api, text_corpus):
    body = json.dumps(readme_job(text_corpus)).encode()
    assert api.post("/v1/jobs", content=body, headers={"content-type": "text/plain"}).status_code in (415, 422)
    assert api.post("/v1/jobs", data={"type": "pretrain", "corpus_id": text_corpus}).status_code in (415, 422)
    assert_no_jobs(api)


def test_wrong_content_type_is_named(api, text_corpus):
    body = json.dumps(readme_job(text_corpus)).encode()
    response = api.post("/v1/jobs", content=body, headers={"content-type": "text/plain"})
    assert response.status_code in (415, 422), response.text
    assert "application/json" in response.json()["error"]["message"], response.text


def test_cancel_a_queued_job(api, text_corpus):
    job = api.post("/v1/jobs", json=readme_job(text_corpus)).json()
    response = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["status"] == "cancelled" and cancelled["cancel_requested"] is True
    assert cancelled["finished_at"] is not None and cancelled["started_at"] is None
    assert api.get(f"/v1/jobs/{job['id']}").json() == cancelled
    assert_error(api.post(f"/v1/jobs/{job['id']}/cancel"), 409, "already ended cancelled")
    events = api.get(f"/v1/jobs/{job['id']}/events").json()["data"]
    assert [(e["type"], e["data"]) for e in events] == [("status", {"status": "queued"}),
                                                        ("status", {"status": "cancelled"})]
    assert events[0]["id"] < events[1]["id"]


def test_unknown_job_is_404_everywhere(api):
    assert_error(api.get("/v1/jobs/job_nope"), 404, "job_nope")
    assert_error(api.post("/v1/jobs/job_nope/cancel"), 404, "job_nope")
    assert_error(api.get("/v1/jobs/job_nope/events"), 404, "job_nope")
    assert_error(api.get("/v1/jobs/job_nope/events/stream"), 404, "job_nope")
    assert_error(api.get("/v1/jobs/job_nope/metrics", params={"name": "train_loss"}), 404, "job_nope")


def parse_sse(text: str) -> list[dict]:
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append({"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def test_event_stream_of_a_cancelled_job_ends(api, text_corpus):
    job = api.post("/v1/jobs", json=readme_job(text_corpus)).json()
    api.post(f"/v1/jobs/{job['id']}/cancel")
    response = api.get(f"/v1/jobs/{job['id']}/events/stream")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [e["event"] for e in events] == ["status", "status", "end"]
    assert [e["data"]["message"] for e in events[:2]] == ["job queued", "job cancelled before it started"]
    assert events[0]["id"] == str(events[0]["data"]["id"])
    assert events[-1] == {"id": None, "event": "end", "data": {"status": "cancelled"}}
    # resuming after the first event gives the rest
    resumed = parse_sse(api.get(f"/v1/jobs/{job['id']}/events/stream",
                                headers={"last-event-id": events[0]["id"]}).text)
    assert [e["event"] for e in resumed] == ["status", "end"] and resumed[0]["id"] == events[1]["id"]


def test_deleting_a_corpus_that_a_job_uses(api, text_corpus):
    job = api.post("/v1/jobs", json=readme_job(text_corpus)).json()
    assert_error(api.delete(f"/v1/corpora/{text_corpus}"), 409, "used by queued or running job", job["id"])
    api.post(f"/v1/jobs/{job['id']}/cancel")
    assert_error(api.delete(f"/v1/corpora/{text_corpus}"), 409, "referenced by finished jobs", "kept as their record")
    assert api.get(f"/v1/corpora/{text_corpus}").status_code == 200
    assert api.get(f"/v1/jobs/{job['id']}").json()["corpus_id"] == text_corpus


def test_validation_corpus_is_checked(api, text_corpus):
    job = api.post("/v1/jobs", json=readme_job(text_corpus, validation_corpus_id=text_corpus))
    assert job.status_code == 201 and job.json()["validation_corpus_id"] == text_corpus
    classification = upload_corpus(api, SMS, "sms.tsv", "classification")
    assert_error(api.post("/v1/jobs", json=readme_job(text_corpus, validation_corpus_id=classification)), 422,
                 "is a classification corpus", param="validation_corpus_id")
    assert_error(api.post("/v1/jobs", json=readme_job(text_corpus, validation_corpus_id="corpus_nope")), 422,
                 "corpus_nope", param="validation_corpus_id")
    assert len(api.get("/v1/jobs").json()["data"]) == 1


# ---- bugs: inputs that give a 500 -------------------------------------------------------------------------------

NON_FINITE = '{"type": "pretrain", "corpus_id": "%s", "hyperparameters": {"grad_clip": Infinity}}'


def test_infinite_grad_clip_is_422(api, text_corpus):
    response = lenient(api).post("/v1/jobs", content=(NON_FINITE % text_corpus).encode(),
                                 headers={"content-type": "application/json"})
    assert_error(response, 422, "grad_clip")
    assert_no_jobs(api)


@pytest.mark.both_databases
@pytest.mark.parametrize("path, params", [("events", {"after": 10**30}),
                                          ("metrics", {"name": "train_loss", "since_step": 10**30})])
def test_huge_cursor_is_not_a_500(api, text_corpus, path, params):
    job = api.post("/v1/jobs", json=readme_job(text_corpus)).json()
    response = lenient(api).get(f"/v1/jobs/{job['id']}/{path}", params=params)
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert response.json()["data"] == []


@pytest.mark.both_databases
def test_huge_last_event_id(api, text_corpus):
    job = api.post("/v1/jobs", json=readme_job(text_corpus)).json()
    api.post(f"/v1/jobs/{job['id']}/cancel")
    response = lenient(api).get(f"/v1/jobs/{job['id']}/events/stream", headers={"last-event-id": str(10**30)})
    if response.status_code == 200:
        assert response.text.rstrip().endswith('event: end\ndata: {"status": "cancelled"}'), repr(response.text)
    else:
        assert_error(response, 422, "last-event-id")


NUL_REQUESTS = [
    ("job_name", "post", "/v1/jobs", {"json": {"name": "a\x00b"}}),
    ("corpus_id", "post", "/v1/jobs", {"json": {"corpus_id": "corpus_\x00"}}),
    ("get_job", "get", "/v1/jobs/job_%00", {}),
    ("cancel_job", "post", "/v1/jobs/job_%00/cancel", {}),
    ("list_after", "get", "/v1/jobs", {"params": {"after": "job_\x00"}}),
    ("metric_name", "get", "/v1/jobs/{job}/metrics", {"params": {"name": "loss\x00"}}),
]


@pytest.mark.both_databases
@pytest.mark.parametrize("method, url, kwargs", [case[1:] for case in NUL_REQUESTS],
                         ids=[case[0] for case in NUL_REQUESTS])
def test_nul_characters_are_not_a_500(api, text_corpus, method, url, kwargs):
    job = api.post("/v1/jobs", json=readme_job(text_corpus)).json()
    if "json" in kwargs:
        kwargs = {"json": readme_job(text_corpus, **kwargs["json"])}
    response = getattr(lenient(api), method)(url.format(job=job["id"]), **kwargs)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert_error(response, response.status_code)


def test_a_shape_too_big_to_train_is_422_with_the_estimate(api, text_corpus):
    huge = {"preset": "gpt2", "n_layer": 128, "n_head": 128, "n_embd": 16384, "context_length": 32768}
    body = readme_job(text_corpus, model=huge, hyperparameters={"max_steps": 1, "batch_size": 4096})
    assert_error(api.post("/v1/jobs", json=body), 422, "PiB", "16.0 GiB", "max_training_memory_bytes",
                 param="model")
    assert_no_jobs(api)


def test_the_training_memory_limit_counts_batch_size_and_block_size(api, text_corpus):
    api.app.state.services.settings.max_training_memory_bytes = 1024**3
    # nano at batch 8 x 128 tokens: about 450 MiB, mostly the logits over GPT-2's vocabulary; 3.2 GiB at batch 64
    assert api.post("/v1/jobs", json=readme_job(text_corpus)).status_code == 201
    big_batch = readme_job(text_corpus, hyperparameters={"max_steps": 1, "batch_size": 64})
    assert_error(api.post("/v1/jobs", json=big_batch), 422, "batch_size 64", "3.2 GiB", "1.0 GiB", param="model")
    short_windows = readme_job(text_corpus, hyperparameters={"max_steps": 1, "batch_size": 64, "block_size": 16})
    assert api.post("/v1/jobs", json=short_windows).status_code == 201


def test_a_finetune_is_held_to_the_training_memory_limit(api):
    from model import GPTConfig

    api.app.state.services.settings.max_training_memory_bytes = 1024**3
    base = insert_checkpoint(api, model_config=GPTConfig.preset("gpt2").to_dict())  # 124M parameters: 475 MiB
    records = b'{"instruction": "Say hi.", "output": "Hi."}\n' * 4
    instructions = upload_corpus(api, records, "i.jsonl", "instruction")
    texts = upload_corpus(api, b"ham\thello\nspam\twin cash\n" * 4, "sms.tsv", "classification")

    def finetune(kind, corpus, **changes):
        hyperparameters = {"max_steps": 1, "batch_size": 4, "max_length": 128, **changes.pop("hp", {})}
        return api.post("/v1/jobs", json={"type": kind, "corpus_id": corpus, "base_checkpoint_id": base,
                                          "hyperparameters": hyperparameters, **changes})

    # every weight with its gradient and AdamW state: about 1.9 GiB before any activation
    assert_error(finetune("finetune_instruct", instructions), 422, "GiB", "max_training_memory_bytes",
                 "lora", param="model")
    assert finetune("finetune_instruct", instructions, lora={"rank": 8}).status_code == 201
    # the top block and the head: the frozen weights, and activations of 4 x 128 tokens
    assert finetune("finetune_classifier", texts).status_code == 201
    assert_error(finetune("finetune_classifier", texts, hp={"batch_size": 16}), 422, "batch_size 16", param="model")
    assert_error(finetune("finetune_classifier", texts, trainable_blocks=12), 422, "GiB", param="model")


def test_a_job_is_costed_before_it_is_started(api, text_corpus):
    from model import GPTConfig
    from model.memory import num_parameters, training_bytes

    nano = GPTConfig.preset("nano", vocab_size=50257)
    estimate = api.post("/v1/jobs/estimate", json=readme_job(text_corpus, hyperparameters={
        "batch_size": 8, "grad_accum_steps": 2, "block_size": 64})).json()
    assert estimate == {"object": "job.estimate", "parameters": num_parameters(nano),
                        "memory_bytes": training_bytes(nano, 8, 64), "memory_limit_bytes": 16 * 1024**3,
                        "tokens_per_step": 8 * 2 * 64, "steps": 200, "fits": True, "refusal": None}
    huge = api.post("/v1/jobs/estimate", json=readme_job(text_corpus, model={"preset": "gpt2-xl"},
                                                         hyperparameters={"batch_size": 64})).json()
    assert huge["fits"] is False and "max_training_memory_bytes" in huge["refusal"]
    assert huge["parameters"] > 1.5e9
    assert_error(api.post("/v1/jobs/estimate", json=readme_job("corpus_nope")), 422, "corpus_nope")
    assert_no_jobs(api)  # an estimate starts nothing
    presets = {p["name"]: p for p in api.get("/v1/jobs/presets").json()["data"]}
    assert presets["gpt2"]["n_layer"] == 12 and "nano" in presets
    assert [presets[name]["family"] for name in ("nano", "llama-mini", "qwen3-small")] == ["gpt2", "llama", "qwen3"]


def test_a_run_of_epochs_is_counted_in_steps_from_the_corpus(api, text_corpus):
    corpus = api.get(f"/v1/corpora/{text_corpus}").json()
    body = readme_job(text_corpus, hyperparameters={"epochs": 3, "batch_size": 2, "grad_accum_steps": 1},
                      model={"preset": "nano", "context_length": 16})
    estimate = api.post("/v1/jobs/estimate", json=body).json()
    windows = corpus["n_tokens"] * 0.9 / 16  # the training split's tokens, in windows of the context
    assert estimate["steps"] == max(1, -(-3 * (windows / 2) // 1))
    job = api.post("/v1/jobs", json=body).json()
    assert job["progress"]["total_steps"] == estimate["steps"] and job["spec"]["hyperparameters"]["epochs"] == 3
    assert job["spec"]["hyperparameters"]["max_steps"] is None
    assert api.post("/v1/jobs/estimate", json=readme_job(text_corpus)).json()["steps"] == 200
