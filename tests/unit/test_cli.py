from model.checkpoint import load_checkpoint
from scratchllm.cli import main


def test_demo_trains_saves_and_streams_from_a_checkpoint(tmp_path, capsys):
    main(["demo", "--steps", "30", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "tokenizer: byte-level BPE with 512 tokens" in out
    assert "loaded step 30" in out
    model, tokenizer, meta = load_checkpoint(tmp_path / "checkpoints" / "step-0000030")
    assert meta["tokenizer"]["type"] == "bpe" and tokenizer.vocab_size == 512
    assert model.config.vocab_size == 512
    streamed = out.split("streaming a sample:\n\n", 1)[1]
    assert streamed.startswith("Alice") and len(streamed) > len("Alice\n")
