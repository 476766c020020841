import hashlib
import json

import pytest

from tests.helpers import assert_error


def upload(api, content: bytes, filename: str, kind: str, **fields):
    return api.post("/v1/corpora", data={"kind": kind, **fields}, files={"file": (filename, content)})


@pytest.mark.both_databases
def test_upload_text_corpus_and_read_it_back(api, shared_data):
    content = (shared_data / "the-verdict.txt").read_bytes()
    response = upload(api, content, "the-verdict.txt", "text")
    assert response.status_code == 201, response.text
    corpus = response.json()
    assert corpus["id"].startswith("corpus_") and corpus["kind"] == "text" and corpus["format"] == "txt"
    assert corpus["size_bytes"] == len(content) and corpus["sha256"] == hashlib.sha256(content).hexdigest()
    assert corpus["n_tokens"] == 5145  # the book's count for the-verdict.txt with GPT-2's tokenizer
    assert corpus["name"] == "the-verdict.txt"
    assert api.get(f"/v1/corpora/{corpus['id']}").json() == corpus
    download = api.get(f"/v1/corpora/{corpus['id']}/content")
    assert download.status_code == 200 and download.content == content


def test_classification_and_instruction_corpora(api, shared_data):
    sms = b"\n".join((shared_data / "SMSSpamCollection.tsv").read_bytes().split(b"\n")[:200])
    response = upload(api, sms, "sms.tsv", "classification", name="spam slice")
    assert response.status_code == 201, response.text
    assert response.json()["label_names"] == ["ham", "spam"] and response.json()["n_records"] == 200
    records = json.loads((shared_data / "instruction-data.json").read_text())[:50]
    response = upload(api, json.dumps(records).encode(), "instructions.json", "instruction")
    assert response.status_code == 201, response.text
    assert response.json()["n_records"] == 50 and response.json()["format"] == "json"


@pytest.mark.both_databases
def test_list_paginates_newest_first_and_filters_by_kind(api):
    ids = [upload(api, f"text {i}\n".encode(), f"t{i}.txt", "text").json()["id"] for i in range(5)]
    upload(api, b"text,label\na,x\nb,y\n", "c.csv", "classification")
    page = api.get("/v1/corpora", params={"limit": 2, "kind": "text"}).json()
    assert [c["id"] for c in page["data"]] == ids[::-1][:2] and page["has_more"] is True
    page = api.get("/v1/corpora", params={"limit": 2, "kind": "text", "after": page["data"][-1]["id"]}).json()
    assert [c["id"] for c in page["data"]] == ids[::-1][2:4] and page["has_more"] is True
    page = api.get("/v1/corpora", params={"limit": 10, "kind": "text", "after": ids[1]}).json()
    assert [c["id"] for c in page["data"]] == [ids[0]] and page["has_more"] is False
    assert len(api.get("/v1/corpora").json()["data"]) == 6


def test_delete_removes_row_and_file(api, tmp_path):
    corpus = upload(api, b"hello\n", "a.txt", "text").json()
    stored = tmp_path / "data" / "corpora" / corpus["id"]
    assert stored.is_dir()
    assert api.delete(f"/v1/corpora/{corpus['id']}").json() == {"id": corpus["id"], "object": "corpus",
                                                                "deleted": True}
    assert not stored.exists()
    assert api.get(f"/v1/corpora/{corpus['id']}").status_code == 404


@pytest.mark.parametrize("content, filename, kind, status, words", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00binary", "image.txt", "text", 422, ("binary",)),
    (b"fine line\ncaf\xe9 latin-1\n", "latin.txt", "text", 422, ("line 2", "not UTF-8")),
    (b"", "empty.txt", "text", 422, ("empty",)),
    (b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{oops\n', "c.jsonl", "classification", 422,
     ("line 3", "bad JSON")),
    (b"text,label\nonly,one\nsame,one\n", "c.csv", "classification", 422, ("two labels",)),
    (b'[{"instruction": "a", "output": "b"}, {"output": "c"}]', "i.json", "instruction", 422,
     ("record 2", "instruction")),
    (b"[" * 100_000, "i.json", "instruction", 422, ("record 1", "nested too deeply")),
    (b'[{"instruction": "a", "output": "b"} oops', "i.json", "instruction", 422, ("record 2", "bad JSON")),
    ("".join(f"{i}\tt\n" for i in range(2000)).encode(), "many.tsv", "classification", 422,
     ("line 1025", "more than 1024 distinct labels")),
    (b"a,b\n", "data.bin", "classification", 422, ("csv or tsv or jsonl", "'bin'")),
    (b"hello", "a.txt", "poetry", 422, ("kind must be one of",)),
])
def test_bad_uploads_are_clear_4xx_and_leave_nothing(api, tmp_path, content, filename, kind, status, words):
    assert_error(upload(api, content, filename, kind), status, *words)
    assert api.get("/v1/corpora").json()["data"] == []
    staging = tmp_path / "data" / "corpora" / ".staging"
    assert not staging.exists() or list(staging.iterdir()) == []


def test_oversized_upload_is_413_and_leaves_nothing(api, tmp_path):
    assert_error(upload(api, b"x" * 2_000_001, "big.txt", "text"), 413, "upload limit")
    assert api.get("/v1/corpora").json()["data"] == []
    assert list((tmp_path / "data" / "corpora" / ".staging").iterdir()) == []


def test_a_record_corpus_past_its_limit_is_refused_before_it_is_read(api, tmp_path, monkeypatch):
    import app.corpus_files

    monkeypatch.setattr(app.corpus_files, "iter_classification_file", None)  # never reached
    limit = api.app.state.services.settings.max_record_corpus_bytes = 1000
    rows = b"ham\thello there\n" * 100
    assert_error(upload(api, rows, "sms.tsv", "classification"), 422, f"{limit:,} bytes", param="file")
    assert_error(upload(api, b"[]" + b" " * limit, "i.json", "instruction"), 422, "max_record_corpus_bytes")
    assert upload(api, rows, "big.txt", "text").status_code == 201  # a text corpus is checked line by line
    assert list((tmp_path / "data" / "corpora" / ".staging").iterdir()) == []


def test_requests_that_are_not_uploads(api):
    assert_error(api.post("/v1/corpora", json={"kind": "text"}), 415, "multipart/form-data")
    assert_error(api.post("/v1/corpora", data={"kind": "text"}, files={"other": ("a.txt", b"x")}), 422, "'file'")
    assert_error(api.post("/v1/corpora", content=b"--xyz\r\ngarbage", headers={
        "content-type": "multipart/form-data; boundary=xyz"}), 422, "'file'")


def test_unknown_ids_and_bad_parameters(api):
    assert_error(api.get("/v1/corpora/corpus_nope"), 404, "corpus_nope")
    assert_error(api.delete("/v1/corpora/corpus_nope"), 404, "corpus_nope")
    assert_error(api.get("/v1/corpora/corpus_nope/content"), 404, "corpus_nope")
    assert_error(api.get("/v1/corpora", params={"limit": 0}), 422, "limit")
    assert_error(api.get("/v1/corpora", params={"kind": "poetry"}), 422, "kind")


def test_file_names_never_become_paths(api, tmp_path):
    response = upload(api, b"hello\n", "../../etc/passwd.txt", "text")
    assert response.status_code == 201
    corpus = response.json()
    assert corpus["filename"] == "../../etc/passwd.txt"
    assert (tmp_path / "data" / "corpora" / corpus["id"] / "data.txt").read_bytes() == b"hello\n"
    assert not (tmp_path / "etc").exists()
    disposition = api.get(f"/v1/corpora/{corpus['id']}/content").headers["content-disposition"]
    assert ".." not in disposition and "passwd.txt" in disposition


def test_liveness(api):
    assert api.get("/livez").json() == {"status": "ok"}
