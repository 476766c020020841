import codecs
import json
import pickle

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.classification_data import (
    MAX_LABELS,
    ClassificationData,
    DataFormatError,
    balance_classes,
    encode_classification,
    iter_classification_file,
    label_order,
    read_classification_file,
    split_dataset,
)
from model.data import (
    epoch_order,
    n_windows,
    open_tokens,
    random_batch,
    read_token_info,
    split_tokens,
    token_dtype,
    tokenize_to_memmap,
    windows_at,
)
from model.instruction_data import (
    encode_instruction,
    format_prompt,
    format_response,
    instruction_collate,
    iter_instruction_file,
    read_instruction_file,
)
from model.objectives import ClassificationObjective, InstructionObjective, PretrainObjective
from model.tokenizer import gpt2_tokenizer


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.fixture
def verdict_ids(shared_data, tok):
    return tok.encode((shared_data / "the-verdict.txt").read_text(encoding="utf-8"))


# --- pretraining -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "chunk_chars"), [("the-verdict.txt", 64), ("tinyshakespeare.txt", 4096)])
def test_memmap_equals_encoding_the_whole_file(shared_data, tok, tmp_path, name, chunk_chars):
    source = shared_data / name
    info = tokenize_to_memmap(source, tok, tmp_path / "tokens.bin", chunk_chars=chunk_chars)
    expected = tok.encode(source.read_text(encoding="utf-8"))
    tokens = open_tokens(tmp_path / "tokens.bin")
    assert tokens.dtype == np.uint16 and info.dtype == "uint16"
    assert info.n_tokens == len(expected) == len(tokens)
    assert np.array_equal(tokens, expected)
    assert read_token_info(tmp_path / "tokens.bin") == info
    sidecar = json.loads((tmp_path / "tokens.bin.json").read_text())
    assert sidecar == {"dtype": "uint16", "n_tokens": len(expected), "tokenizer": "gpt2"}


@settings(max_examples=150, deadline=None)
@given(pieces=st.lists(st.sampled_from(list("ab Z9'.,!\n\t\r\u00a0é😀") + ["'s", "<|endoftext|>"]),
                       max_size=60),
       chunk_chars=st.integers(1, 9))
def test_chunked_tokenization_never_changes_tokens(tmp_path_factory, tok, pieces, chunk_chars):
    text = "".join(pieces)
    source = tmp_path_factory.mktemp("chunks") / "t.txt"
    source.write_text(text, encoding="utf-8", newline="")
    info = tokenize_to_memmap(source, tok, source.with_suffix(".bin"), chunk_chars=chunk_chars)
    expected = tok.encode(text)
    assert info.n_tokens == len(expected)
    if expected:
        assert open_tokens(info.path).tolist() == expected


def test_token_dtype_widens_past_uint16():
    assert token_dtype(50257) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(100277) == np.uint32


def test_open_tokens_rejects_incomplete_files(shared_data, tok, tmp_path):
    path = tmp_path / "tokens.bin"
    tokenize_to_memmap(shared_data / "the-verdict.txt", tok, path)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="sidecar promises 5145"):
        open_tokens(path)
    with pytest.raises(ValueError, match="no sidecar"):
        open_tokens(tmp_path / "other.bin")


def test_split_tokens_views_with_validation_at_the_end():
    tokens = np.arange(100, dtype=np.uint16)
    train, val = split_tokens(tokens, 0.1, block_size=8)
    assert len(train) == 90 and len(val) == 10
    assert np.shares_memory(train, tokens) and val[0] == 90
    with pytest.raises(ValueError, match=r"validation split .* 10 tokens; a window of 16 needs at least 17"):
        split_tokens(tokens, 0.1, block_size=16)
    with pytest.raises(ValueError, match="val_fraction"):
        split_tokens(tokens, 0.0, block_size=8)


def test_random_batch_is_reproducible_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = random_batch(tokens, 4, 16, torch.Generator().manual_seed(7))
    x2, y2 = random_batch(tokens, 4, 16, torch.Generator().manual_seed(7))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x, x[:, :1] + torch.arange(16))  # each row is one contiguous window
    assert torch.equal(y, x + 1)
    assert int(y.max()) <= 999
    assert not torch.equal(x, random_batch(tokens, 4, 16, torch.Generator().manual_seed(8))[0])
    with pytest.raises(ValueError, match="has 16 tokens"):
        random_batch(tokens[:16], 1, 16, torch.Generator())


def test_sliding_windows_match_the_book(verdict_ids):
    tokens = np.asarray(verdict_ids)
    x, y = windows_at(tokens, np.arange(8) * 4, block_size=4)  # the book's first batch, unshuffled
    assert x[:2].tolist() == [[40, 367, 2885, 1464], [1807, 3619, 402, 271]]
    assert y[0].tolist() == [367, 2885, 1464, 1807]
    assert x.shape == (8, 4)
    count = n_windows(len(tokens), block_size=4, stride=4)
    assert count == len(range(0, 5145 - 4, 4)) == 1286
    x, y = windows_at(tokens, np.array([4]), 4)
    assert [x[0].tolist(), y[0].tolist()] == [[1807, 3619, 402, 271], [3619, 402, 271, 10899]]
    last_x, last_y = windows_at(tokens, np.array([(count - 1) * 4]), 4)
    assert last_y[0].tolist() == verdict_ids[-4:]


def test_sliding_window_count_follows_the_stride():
    tokens = np.arange(21)
    assert n_windows(len(tokens), 4, 2) == 9  # starts 0, 2, ..., 16
    assert windows_at(tokens, np.array([8 * 2]), 4)[1][0].tolist() == [17, 18, 19, 20]
    with pytest.raises(ValueError, match="stride"):
        n_windows(21, 4, 0)


def test_strided_epochs_are_reproducible_and_resumable():
    tokens = np.arange(200)
    task = PretrainObjective(tokens, tokens, block_size=8, batch_size=4, seed=3, stride=8)
    epoch = [task.batch(i)[0] for i in range(6)]  # 24 windows of 8 make 6 batches of 4
    starts = torch.cat(epoch)[:, 0]
    assert sorted(starts.tolist()) == list(range(0, 192, 8))  # all 24 windows, each once
    # batch i is a function of the seed and i: a resumed run takes up at any batch
    again = PretrainObjective(tokens, tokens, block_size=8, batch_size=4, seed=3, stride=8)
    assert all(torch.equal(epoch[i], again.batch(i)[0]) for i in (5, 2, 0))
    next_epoch = torch.cat([task.batch(i)[0] for i in range(6, 12)])
    assert sorted(next_epoch[:, 0].tolist()) == sorted(starts.tolist()) and not torch.equal(next_epoch,
                                                                                              torch.cat(epoch))
    other_seed = PretrainObjective(tokens, tokens, block_size=8, batch_size=4, seed=4, stride=8)
    assert not torch.equal(torch.cat(epoch), torch.cat([other_seed.batch(i)[0] for i in range(6)]))


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    order = epoch_order(50, epoch=3, seed=1337)
    assert sorted(order.tolist()) == list(range(50))
    assert np.array_equal(order, epoch_order(50, epoch=3, seed=1337))
    assert not np.array_equal(order, epoch_order(50, epoch=4, seed=1337))
    assert not np.array_equal(order, epoch_order(50, epoch=3, seed=1338))


# --- classification ----------------------------------------------------------------------------------


def test_reads_the_raw_sms_spam_collection(shared_data):
    data = read_classification_file(shared_data / "SMSSpamCollection.tsv")
    assert len(data) == len(data.labels) == 5574
    assert data.label_names == ["ham", "spam"]
    assert sum(data.labels) == 747
    assert data.texts[0].startswith("Go until jurong point") and data.labels[:3] == [0, 0, 1]


def test_reads_csv_tsv_and_jsonl(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('id,text,label\n1,"hello, ""world""\nsecond line",pos\n2,bad,neg\n\n3,fine,pos\n')
    data = read_classification_file(csv_file)
    assert data.texts == ['hello, "world"\nsecond line', "bad", "fine"]
    assert data.label_names == ["neg", "pos"] and data.labels == [1, 0, 1]
    fixed = read_classification_file(csv_file, label_names=["pos", "neg"])
    assert fixed.labels == [0, 1, 0]

    tsv_file = tmp_path / "d.tsv"
    tsv_file.write_text('label\ttext\n10\tsay "hi\n2\tbye\n')
    data = read_classification_file(tsv_file)
    assert data.texts == ['say "hi', "bye"] and data.label_names == ["2", "10"] and data.labels == [1, 0]

    jsonl_file = tmp_path / "d.jsonl"
    rows = [{"body": "a\u2028b", "y": 1}, {"body": "c", "y": 0}]
    jsonl_file.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    data = read_classification_file(jsonl_file, text_field="body", label_field="y")
    assert data.texts == ["a\u2028b", "c"] and data.label_names == ["0", "1"] and data.labels == [1, 0]


@pytest.mark.parametrize(("name", "content", "message"), [
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", label}\n',
     "line 3: bad JSON"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"label": "y"}\n', "line 2: missing field 'text'"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n\n{"text": " ", "label": "y"}\n', "line 3: empty text"),
    ("d.csv", "text,label\na,x\nb,x\n", "at least two labels, found ['x']"),
    ("d.csv", "body,label\na,x\n", "line 1: no 'text' column"),
    ("d.csv", "text,label\na,x\nb\n", "line 3: 1 fields"),
    ("d.tsv", "ham\tfine\nspam no tab\n", "line 2: no tab"),
])
def test_format_errors_name_the_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_classification_file(path)


def test_non_utf8_and_unknown_labels_name_the_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_bytes(b"ham\tok\nspam\tcaf\xe9\n")
    with pytest.raises(DataFormatError, match="line 2: not UTF-8"):
        read_classification_file(path)
    path.write_bytes(b"ham\tok\neggs\tno\n")
    with pytest.raises(DataFormatError, match="line 2: label 'eggs' is not one of"):
        read_classification_file(path, label_names=["ham", "spam"])


def test_balance_and_split_give_the_books_sizes(shared_data):
    data = read_classification_file(shared_data / "SMSSpamCollection.tsv")
    balanced = balance_classes(data, seed=123)
    assert len(balanced) == 1494 and sum(balanced.labels) == 747
    assert balance_classes(data, seed=123).texts == balanced.texts
    train, val, test = split_dataset(balanced, (0.7, 0.1, 0.2), seed=123)
    assert (len(train), len(val), len(test)) == (1045, 149, 300)
    assert sorted(train.texts + val.texts + test.texts) == sorted(balanced.texts)
    with pytest.raises(ValueError, match="sum to 1"):
        split_dataset(balanced, (0.5, 0.1))


def test_encode_classification_pads_right_with_exact_lengths(tok):
    texts = ["Hello world", "A longer text than the first one", "x"]
    ids, lengths = encode_classification(texts, tok)
    assert ids.dtype == lengths.dtype == torch.long
    assert ids.shape == (3, int(lengths.max()))
    for row, length, text in zip(ids, lengths, texts, strict=True):
        assert row[:length].tolist() == tok.encode(text)
        assert (row[length:] == 50256).all()
    cut, cut_lengths = encode_classification(texts, tok, max_length=4, pad_id=0)
    assert cut.shape == (3, 4) and cut_lengths.tolist() == [2, 4, 1]
    assert cut[2].tolist() == [tok.encode("x")[0], 0, 0, 0]


def test_classification_batches_trim_and_shuffle_reproducibly(tok):
    data = ClassificationData(["a b c d e", "f", "g h", "i j k"], [0, 1, 0, 1], ["no", "yes"])
    ids, lengths = encode_classification(data.texts, tok)
    labels = torch.tensor(data.labels)
    task = ClassificationObjective((ids, lengths, labels), (ids, lengths, labels), batch_size=2, seed=0)
    epoch = [task.batch(i) for i in range(2)]
    for batch_ids, batch_lengths, _ in epoch:  # each batch as wide as its longest text
        assert batch_ids.shape == (2, int(batch_lengths.max()))
    assert sorted(torch.cat([b[1] for b in epoch]).tolist()) == sorted(lengths.tolist())
    assert sorted(torch.cat([b[2] for b in epoch]).tolist()) == sorted(data.labels)
    again = ClassificationObjective((ids, lengths, labels), (ids, lengths, labels), batch_size=2, seed=0)
    for batch, same in zip(epoch, [again.batch(i) for i in range(2)], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(batch, same, strict=True))


# --- instruction finetuning --------------------------------------------------------------------------


def test_reads_the_books_instruction_data(shared_data):
    records = read_instruction_file(shared_data / "instruction-data.json")
    assert len(records) == 1100
    assert all(set(r) >= {"instruction", "input", "output"} for r in records)


def test_prompt_template_with_and_without_input():
    preamble = ("Below is an instruction that describes a task. "
                "Write a response that appropriately completes the request.")
    with_input = {"instruction": "Edit the sentence.", "input": "He go home.", "output": "He goes home."}
    assert format_prompt(with_input) == (
        f"{preamble}\n\n### Instruction:\nEdit the sentence.\n\n### Input:\nHe go home.")
    without = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert format_prompt(without) == f"{preamble}\n\n### Instruction:\nName a color."
    assert format_response(without) == "\n\n### Response:\nBlue."


def test_collate_matches_the_books_example():
    batch = [([0, 1, 2, 3, 4], 0), ([5, 6], 0), ([7, 8, 9], 0)]
    inputs, targets = instruction_collate(batch)
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    inputs, targets = instruction_collate(batch, max_length=3)
    assert inputs.shape == targets.shape == (3, 3)
    assert targets[1].tolist() == [6, 50256, -100]


def test_collate_masks_prompt_targets():
    inputs, targets = instruction_collate([([10, 11, 12, 13, 14], 3), ([20, 21], 1)], mask_prompt=True)
    assert inputs.tolist() == [[10, 11, 12, 13, 14], [20, 21, 50256, 50256, 50256]]
    assert targets.tolist() == [[-100, -100, 13, 14, 50256], [21, 50256, -100, -100, -100]]


def test_encode_instruction_splits_prompt_and_response(tok):
    record = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    ids, prompt_length = encode_instruction(record, tok)
    assert ids == tok.encode(format_prompt(record) + format_response(record))
    assert ids[:prompt_length] == tok.encode(format_prompt(record))
    task = InstructionObjective([(ids, prompt_length)] * 5, [(ids, prompt_length)], batch_size=2, mask_prompt=True)
    inputs, targets = task.batch(0)
    assert inputs.shape == targets.shape == (2, len(ids))
    assert (targets[:, : prompt_length - 1] == -100).all() and (targets[:, prompt_length - 1:] != -100).all()


def test_instruction_file_errors_name_record_or_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(DataFormatError, match="record 2: missing field 'output'"):
        read_instruction_file(path)
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": 1}\n')
    with pytest.raises(DataFormatError, match="line 2: 'output' must be a string"):
        read_instruction_file(path)
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": }\n')
    with pytest.raises(DataFormatError, match="line 3: bad JSON"):
        read_instruction_file(path)
    path.write_text('{"instruction": "a", "output": "b"}\n')
    assert read_instruction_file(path) == [{"instruction": "a", "input": "", "output": "b"}]


@pytest.mark.parametrize(("content", "message"), [
    (b"[" + b"[" * 100_000, "record 1: nested too deeply \\(past 16 levels\\)"),
    (b'[{"instruction": "a", "output": "b"}, {"instruction": x}]', "record 2: bad JSON: lexical error"),
    (b'[{"instruction": "a", "output": "b"}] [1]', "record 2: bad JSON: parse error: trailing garbage"),
    (b'[{"instruction": "a", "output": "\xff"}]', "record 1: bad JSON: lexical error: invalid bytes in UTF8"),
    (b'[{"instruction": "a", "output": "b"}', "record 2: bad JSON: parse error: premature EOF"),
    (b"[]", "no records"),
    (b"\n \n", "no records"),
])
def test_a_json_list_is_read_one_record_at_a_time(tmp_path, content, message):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    with pytest.raises(DataFormatError, match=message) as caught:
        read_instruction_file(path)
    assert "right here" not in str(caught.value) and "\n" not in caught.value.problem  # no quote of the file


def test_a_json_list_with_a_byte_order_mark_and_deep_but_allowed_fields(tmp_path):
    path = tmp_path / "d.json"
    record = {"instruction": "a", "output": "b", "meta": [[[{"k": [1.5, None, True]}]]]}
    path.write_bytes(codecs.BOM_UTF8 + b"  \n" + json.dumps([record, record]).encode())
    assert read_instruction_file(path) == [{"input": "", **record}] * 2
    assert [r["instruction"] for r in iter_instruction_file(path)] == ["a", "a"]


def test_classification_rows_stream_and_labels_are_bounded(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("".join(f"label{i}\ttext {i}\n" for i in range(MAX_LABELS + 1)))
    rows = iter_classification_file(path)
    assert next(rows) == ("text 0", "label0")  # read lazily: the bad last line is not reached yet
    with pytest.raises(DataFormatError, match=f"line {MAX_LABELS + 1}: more than {MAX_LABELS} distinct labels"):
        list(rows)
    with pytest.raises(DataFormatError, match="at least two labels, found \\['x'\\]"):
        label_order(path, {"x"})
    assert label_order(path, {"10", "2", "-1"}) == ["-1", "2", "10"]


def test_data_format_error_survives_pickling(tmp_path):
    original = DataFormatError(tmp_path / "d.json", "missing field 'output'", 2, "record")
    error = pickle.loads(pickle.dumps(original))
    assert str(error).endswith("d.json: record 2: missing field 'output'") and error.line == 2
