from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model import GPT, GPTConfig
from model.generate import Decoder, generate, generate_batch, stream_generate
from model.sampling import (
    SamplingParams,
    adjusted_logits,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    next_token,
)
from model.streaming import TextStream
from model.tokenizer import gpt2_tokenizer

CONFIG = GPTConfig(vocab_size=50257, context_length=48, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def untied_model():
    torch.manual_seed(1)
    return GPT(replace(CONFIG, tie_embeddings=False)).eval()


@pytest.mark.parametrize("head", ["tied", "untied"])
def test_cached_logits_equal_full_recompute(model, untied_model, head):
    model = model if head == "tied" else untied_model
    idx = torch.randint(0, CONFIG.vocab_size, (2, 20))
    full = model(idx)[0]
    decoder = Decoder(model, 2)
    with torch.inference_mode():
        steps = [decoder.logits(idx[:, :8])]
        steps += [decoder.logits(idx[:, t: t + 1]) for t in range(8, 20)]
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 7:], atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_a_model_packed_for_batches_decodes_the_same_logits(tie):
    torch.manual_seed(2)
    model = GPT(replace(CONFIG, tie_embeddings=tie)).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (3, 12))
    full = model(idx)[0]
    model.pack_for_batches()
    if not tie:  # the untied head is packed once, as a Linear
        assert model.packed_output is model.lm_head.packed
    assert (model.packed_output is not None) == torch.backends.mkldnn.is_available()
    decoder = Decoder(model, 3)
    with torch.inference_mode():
        steps = [decoder.logits(idx[:, :6])]
        steps += [decoder.logits(idx[:, t: t + 1]) for t in range(6, 12)]
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 5:], atol=1e-4)


def test_cache_slots_of_different_lengths_decode_together(model):
    a, b = torch.randint(0, CONFIG.vocab_size, (1, 5)), torch.randint(0, CONFIG.vocab_size, (1, 11))
    decoder = Decoder(model, 3)
    with torch.inference_mode():
        decoder.logits(a, torch.tensor([2]))
        decoder.logits(b, torch.tensor([0]))
        nxt = torch.randint(0, CONFIG.vocab_size, (2, 1))
        both = decoder.logits(nxt, torch.tensor([2, 0]))
    assert torch.allclose(both[0], model(torch.cat([a, nxt[:1]], 1))[0][0, -1], atol=1e-4)
    assert torch.allclose(both[1], model(torch.cat([b, nxt[1:]], 1))[0][0, -1], atol=1e-4)
    assert decoder.cache.lengths.tolist() == [12, 0, 6]


def test_the_first_rows_of_a_larger_cache_decode_in_place(model):
    """slots=None means rows 0..B-1, even when the cache has more slots: keys are read without a gather."""
    a, b = torch.randint(0, CONFIG.vocab_size, (1, 4)), torch.randint(0, CONFIG.vocab_size, (1, 9))
    decoder = Decoder(model, 5)
    with torch.inference_mode():
        decoder.logits(a, torch.tensor([0]))
        decoder.logits(b, torch.tensor([1]))
        decoder.logits(torch.randint(0, CONFIG.vocab_size, (1, 3)), torch.tensor([4]))  # a slot left alone
        nxt = torch.randint(0, CONFIG.vocab_size, (2, 1))
        both = decoder.logits(nxt)
    assert torch.allclose(both[0], model(torch.cat([a, nxt[:1]], 1))[0][0, -1], atol=1e-4)
    assert torch.allclose(both[1], model(torch.cat([b, nxt[1:]], 1))[0][0, -1], atol=1e-4)
    assert decoder.cache.lengths.tolist() == [5, 10, 0, 0, 3]


def test_greedy_with_and_without_cache_agree(model):
    idx = torch.randint(0, CONFIG.vocab_size, (2, 6))
    out = generate(model, idx, 15)
    assert out.shape == (2, 21) and torch.equal(out[:, :6], idx)
    assert torch.equal(out, generate(model, idx, 15, use_cache=False))
    step_by_step = idx
    for _ in range(15):  # greedy = argmax of the full forward pass
        step_by_step = torch.cat([step_by_step, model(step_by_step)[0][:, -1:].argmax(-1)], 1)
    assert torch.equal(out, step_by_step)


def test_sampling_is_reproducible_with_a_seed(model):
    idx = torch.randint(0, CONFIG.vocab_size, (2, 4))
    kwargs = dict(temperature=1.0, top_k=100, top_p=0.9)
    first = generate(model, idx, 12, seed=7, **kwargs)
    assert torch.equal(first, generate(model, idx, 12, seed=7, **kwargs))
    assert not torch.equal(first, generate(model, idx, 12, seed=8, **kwargs))


def test_generation_stops_at_the_context_limit(model):
    idx = torch.randint(0, CONFIG.vocab_size, (1, 40))
    assert generate(model, idx, 100).shape == (1, 48)
    events = list(stream_generate(model, gpt2_tokenizer(), idx[0].tolist(), 100))
    assert len(events) == 8 and events[-1].finish_reason == "length"
    with pytest.raises(ValueError, match="context length"):
        generate(model, torch.zeros(1, 49, dtype=torch.long), 1)


def test_eos_stops_rows_and_pads_them(model):
    idx = torch.randint(0, CONFIG.vocab_size, (2, 5))
    new = generate(model, idx, 10, temperature=1.0, seed=4)[0, 5:].tolist()
    first_new = next(i for i in range(1, 10) if new[i] not in new[:i])
    out = generate(model, idx, 10, temperature=1.0, seed=4, eos_id=new[first_new])
    assert (out[0, 5 + first_new:] == new[first_new]).all()
    assert out[0, 5: 5 + first_new].tolist() == new[:first_new]
    without = generate(model, idx, 10)
    assert without.shape == (2, 15)  # no eos_id: never stops early


def test_batched_generation_of_different_lengths_matches_one_by_one(model):
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,)).tolist() for n in (3, 9, 1)]
    together = generate_batch(model, prompts, 10)
    for prompt, new in zip(prompts, together, strict=True):
        alone = generate(model, torch.tensor([prompt]), 10)[0, len(prompt):].tolist()
        assert new == alone
    sampled = generate_batch(model, prompts, 8, SamplingParams(temperature=0.8), seed=3)
    assert sampled == generate_batch(model, prompts, 8, SamplingParams(temperature=0.8), seed=3)


def test_top_k_top_p_and_repetition_penalty():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert torch.isinf(filter_top_k(logits, 2)[0, [0, 3]]).all()
    assert not torch.isinf(filter_top_k(logits, 2)[0, [1, 2]]).any()
    probs = logits.softmax(-1)[0]  # sorted: 3.0 (0.61), 2.0 (0.22), 1.0 (0.08), 0.5 (0.05)
    assert probs[1] > 0.6
    kept = ~torch.isinf(filter_top_p(logits, 0.6)[0])
    assert kept.tolist() == [False, True, False, False]
    kept = ~torch.isinf(filter_top_p(logits, 0.7)[0])
    assert kept.tolist() == [False, True, True, False]
    penalised = apply_repetition_penalty(torch.tensor([[2.0, -2.0, 1.0]]), torch.tensor([[0, 1]]), 2.0)
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]
    assert next_token(logits, SamplingParams()).item() == 1
    assert next_token(logits, SamplingParams(repetition_penalty=10.0), torch.tensor([[1]])).item() == 2
    gen = torch.Generator().manual_seed(0)
    top1 = SamplingParams(temperature=1.0, top_k=1)
    draws = {next_token(logits, top1, None, [gen]).item() for _ in range(20)}
    assert draws == {1}


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(repetition_penalty=0), dict(min_p=1.5), dict(frequency_penalty=float("inf")),
                                 dict(presence_penalty=float("nan")), dict(logit_bias=((-1, 1.0),)),
                                 dict(logit_bias=((3, float("inf")),))])
def test_invalid_sampling_parameters(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


EXTREMES = [5e-324, 1e-300, 1e-45, 1e-38, 1e-8, 1.0, 1e8, 1e38, 1e300, float("inf")]
POSITIVE = st.one_of(st.sampled_from(EXTREMES), st.floats(min_value=0, exclude_min=True))
FINITE = st.one_of(st.sampled_from([0.0, -2.0, 2.0, 1e300, -1e300]), st.floats(allow_nan=False, allow_infinity=False))


@settings(max_examples=300, deadline=None)
@given(temperature=st.one_of(st.just(0.0), POSITIVE), top_k=st.none() | st.integers(min_value=1, max_value=2**70),
       top_p=st.none() | st.floats(min_value=0, max_value=1, exclude_min=True), penalty=POSITIVE,
       scale=st.sampled_from([0.0, 1.0, 1e4]), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seeded=st.booleans(), min_p=st.none() | st.floats(min_value=0, max_value=1),
       additive=st.tuples(FINITE, FINITE), bias=st.lists(st.tuples(st.integers(0, 49), FINITE), max_size=3))
def test_next_token_is_a_valid_id_for_every_accepted_parameter(temperature, top_k, top_p, penalty, scale, dtype,
                                                                seeded, min_p, additive, bias):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty,
                            min_p=min_p, frequency_penalty=additive[0], presence_penalty=additive[1],
                            logit_bias=tuple(bias))
    logits = (torch.randn(2, 50, generator=torch.Generator().manual_seed(0)) * scale).to(dtype)
    logits[:, 7] = 0  # a zero logit the penalty sees: 0 * inf and 0 / 0 are NaN
    seen = torch.tensor([[7, 3, 11], [7, 20, 21]])
    generators = [torch.Generator().manual_seed(i) for i in range(2)] if seeded else None
    token = next_token(logits, params, seen, generators, n_prompt=1)
    assert token.shape == (2,) and bool(((token >= 0) & (token < 50)).all())


def test_frequency_and_presence_penalties_are_additive_on_the_output_only():
    logits = torch.tensor([[3.0, 2.9, 2.8, 0.0]])
    history = torch.tensor([[1, 0, 0, 2]])  # the prompt holds token 1; the output token 0 twice, token 2 once
    frequency = SamplingParams(frequency_penalty=0.2)
    assert torch.allclose(adjusted_logits(logits, frequency, history, n_prompt=1),
                          torch.tensor([[3.0 - 0.4, 2.9, 2.8 - 0.2, 0.0]]))
    presence = SamplingParams(presence_penalty=0.3)
    assert torch.allclose(adjusted_logits(logits, presence, history, n_prompt=1),
                          torch.tensor([[3.0 - 0.3, 2.9, 2.8 - 0.3, 0.0]]))
    assert next_token(logits, frequency, history, n_prompt=1).item() == 1  # 2.9 beats 2.6 and 2.6
    assert next_token(logits, SamplingParams(frequency_penalty=-1.0), history, n_prompt=1).item() == 0


def test_logit_bias_and_min_p():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]])
    assert next_token(logits, SamplingParams(logit_bias=((3, 100.0),))).item() == 3
    assert next_token(logits, SamplingParams(logit_bias=((0, -100.0), (1, -100.0)))).item() == 2
    # min_p 0.5 keeps only tokens at least half as likely as the best: token 0 alone (token 1 is e^-1 as likely)
    draws = {next_token(logits, SamplingParams(temperature=1.0, min_p=0.5), generators=[
        torch.Generator().manual_seed(i)]).item() for i in range(30)}
    assert draws == {0}
    wide = {next_token(logits, SamplingParams(temperature=1.0, min_p=0.3), generators=[
        torch.Generator().manual_seed(i)]).item() for i in range(60)}
    assert wide == {0, 1}


@pytest.mark.parametrize("temperature", [5e-324, 1e-300, 1e-45])
def test_a_temperature_too_small_to_sample_from_is_greedy(temperature):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 5
    seen = torch.tensor([[1, 2], [3, 4], [5, 6]])
    params = SamplingParams(temperature=temperature, top_k=5, top_p=0.5, repetition_penalty=1.3)
    greedy = apply_repetition_penalty(logits, seen, 1.3).argmax(dim=-1)
    assert next_token(logits, params, seen).tolist() == greedy.tolist()
    generators = [torch.Generator().manual_seed(i) for i in range(3)]
    assert next_token(logits, params, seen, generators).tolist() == greedy.tolist()


def test_a_repetition_penalty_past_the_float_range_saturates_without_nan():
    logits, seen, largest = torch.tensor([[2.0, -2.0, 0.0, 1.0]]), torch.tensor([[0, 1, 2]]), torch.finfo().max
    assert apply_repetition_penalty(logits, seen, 1e-300).tolist() == [[largest, 0.0, 0.0, 1.0]]
    assert apply_repetition_penalty(logits, seen, float("inf")).tolist() == [[0.0, -largest, 0.0, 1.0]]
    assert next_token(logits, SamplingParams(repetition_penalty=float("inf")), seen).item() == 3


def test_stream_deltas_concatenate_to_the_decoded_text(model, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    events = list(stream_generate(model, tokenizer, prompt, 30, SamplingParams(temperature=1.0), seed=1))
    ids = [e.token_id for e in events]
    assert "".join(e.text for e in events) == tokenizer.decode(ids)
    same = generate(model, torch.tensor([prompt]), 30, temperature=1.0, seed=1)
    assert ids == same[0, len(prompt):].tolist()
    assert [e.finish_reason for e in events[:-1]] == [None] * 29 and events[-1].finish_reason == "length"


def test_stream_ends_on_eos_without_emitting_it(model, tokenizer):
    prompt = tokenizer.encode("Hello")
    sampled = SamplingParams(temperature=1.0)
    tokens = [e.token_id for e in stream_generate(model, tokenizer, prompt, 10, sampled, seed=2)]
    first_new = next(i for i in range(1, 10) if tokens[i] not in tokens[:i])
    events = list(stream_generate(model, tokenizer, prompt, 10, sampled, eos_id=tokens[first_new], seed=2))
    assert events[-1].finish_reason == "eos" and len(events) == first_new + 1
    assert "".join(e.text for e in events) == tokenizer.decode(tokens[:first_new])


def test_multibyte_character_split_over_tokens_is_never_emitted_half(tokenizer):
    text = "héllo 😀 日本語"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode_bytes([i]) for i in ids]
    assert any(_is_partial_utf8(p) for p in pieces)  # the emoji is split over several tokens
    stream = TextStream(tokenizer)
    deltas = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def _is_partial_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_stop_string_split_across_tokens_never_leaks(tokenizer):
    text = "The answer is 42.\n### Instruction: more"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, stop=["###"])
    deltas = []
    for i in ids:
        deltas.append(stream.push(i))
        if stream.stopped_by:
            break
    assert stream.stopped_by == "###"
    assert "".join(deltas) == "The answer is 42.\n" == stream.final_text
    assert all("#" not in d for d in deltas)


def test_stop_string_prefix_that_does_not_complete_is_released(tokenizer):
    stream = TextStream(tokenizer, stop=["STOP"])
    deltas = [stream.push(i) for i in tokenizer.encode("a ST then more")] + [stream.finish()]
    assert "".join(deltas) == "a ST then more" and stream.stopped_by is None
    stream = TextStream(tokenizer, stop=["end"])
    deltas = [stream.push(i) for i in tokenizer.encode("we")] + [stream.finish()]
    assert "".join(deltas) == "we"


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=40), st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_stream_never_emits_a_stop_string_and_loses_nothing(text, stops):
    tokenizer = gpt2_tokenizer()
    stream = TextStream(tokenizer, stop=stops)
    emitted = ""
    for token in tokenizer.encode(text, allow_special=False):
        emitted += stream.push(token)
        if stream.stopped_by:
            break
    emitted += stream.finish()
    decoded = tokenizer.decode(tokenizer.encode(text, allow_special=False))
    cut = min((i for s in stops if (i := decoded.find(s)) >= 0), default=None)
    expected = decoded if cut is None else decoded[:cut]
    if stream.stopped_by is None:
        assert emitted == expected
    else:  # the first stop string to be completed ends the text
        assert emitted == stream.final_text and not any(s in emitted for s in stops)
        assert decoded.startswith(emitted + stream.stopped_by)


def test_stream_with_a_stop_string_from_the_model(model, tokenizer):
    prompt = tokenizer.encode("Hello")
    full = "".join(e.text for e in stream_generate(model, tokenizer, prompt, 20))
    stop = full[5:8]
    events = list(stream_generate(model, tokenizer, prompt, 20, stop=[stop]))
    assert events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events) == full[: full.find(stop)]


def test_cache_overflow_is_an_error(model):
    decoder = Decoder(model, 1, max_length=8)
    with pytest.raises(ValueError, match="KV cache holds 8"), torch.inference_mode():
        decoder.logits(torch.zeros(1, 9, dtype=torch.long))
