import threading
import time

import pytest
import torch

from model import GPT, SamplingParams, generate, gpt2_tokenizer
from model.generate import Decoder
from model.sampling import next_token
from serving.engine import Engine, QueueFull, Request
from tests.helpers import TINY_LM as CONFIG
from tests.helpers import random_adapter
from tests.unit.test_multi_lora import LORAS


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if isinstance(event, Exception) or event.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self):
        return [e.token_id for e in self.events]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(CONFIG).eval()


@pytest.fixture
def engine(model):
    running = Engine(model, gpt2_tokenizer(), max_batch=3, max_queue=16).start()
    yield running
    running.stop()


def test_concurrent_requests_match_one_by_one_generation(engine, model):
    prompts = [torch.randint(0, 50257, (n,)).tolist() for n in (3, 17, 30, 1, 9)]
    collectors = [Collector() for _ in prompts]
    for prompt, collector in zip(prompts, collectors, strict=True):
        engine.submit(Request(prompt, 12, SamplingParams(), collector))
    for prompt, collector in zip(prompts, collectors, strict=True):
        assert collector.done.wait(30)
        alone = generate(model, torch.tensor([prompt]), 12)[0, len(prompt):].tolist()
        assert collector.tokens == alone
        assert collector.events[-1].finish_reason == "length"
        assert [e.finish_reason for e in collector.events[:-1]] == [None] * 11


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    params = SamplingParams(temperature=1.0, top_k=50)
    first, second, noise = Collector(), Collector(), Collector()
    engine.submit(Request([1, 2, 3], 10, params, first, seed=5))
    assert first.done.wait(30)
    engine.submit(Request([7, 8, 9, 10, 11], 20, SamplingParams(temperature=1.0), noise, seed=1))
    engine.submit(Request([1, 2, 3], 10, params, second, seed=5))
    assert second.done.wait(30) and noise.done.wait(30)
    assert first.tokens == second.tokens


def test_abort_frees_the_slot_and_queue_limits(model):
    engine = Engine(model, gpt2_tokenizer(), max_batch=3, max_queue=1)  # not started: nothing is admitted yet
    long_running = [Collector() for _ in range(3)]
    requests = [engine.submit(Request([5], 60, SamplingParams(), c)) for c in long_running]
    waiting = [Collector() for _ in range(1)]
    for collector in waiting:
        engine.submit(Request([6], 5, SamplingParams(), collector))
    with pytest.raises(QueueFull):
        engine.submit(Request([6], 5, SamplingParams(), Collector()))
    engine.start()
    deadline = time.monotonic() + 30
    while engine.load[1] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    for request in requests:
        request.abort()
    deadline = time.monotonic() + 30
    while engine.load != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load == (0, 0)
    assert all(c.events == [] or c.events[-1].finish_reason is None for c in long_running)
    assert all(w.done.wait(30) and w.events[-1].finish_reason == "length" for w in waiting)
    engine.stop()


def test_stop_strings_and_eos_end_a_request(engine, model):
    tokenizer = gpt2_tokenizer()
    prompt = tokenizer.encode("Hello")
    full = Collector()
    engine.submit(Request(prompt, 20, SamplingParams(temperature=1.0), full, seed=3))
    assert full.done.wait(30)
    text = "".join(e.text for e in full.events)
    stop = text[4:7]
    stopped = Collector()
    engine.submit(Request(prompt, 20, SamplingParams(temperature=1.0), stopped, seed=3, stop=(stop,)))
    assert stopped.done.wait(30)
    assert stopped.events[-1].finish_reason == "stop"
    assert "".join(e.text for e in stopped.events) == text[: text.find(stop)]
    eos = Collector()
    tokens = full.tokens
    first_new = next(i for i in range(1, 20) if tokens[i] not in tokens[:i])
    engine.submit(Request(prompt, 20, SamplingParams(temperature=1.0), eos, seed=3, eos_id=tokens[first_new]))
    assert eos.done.wait(30) and eos.events[-1].finish_reason == "eos"
    assert eos.tokens[:-1] == tokens[:first_new]


def test_requests_are_checked(engine):
    with pytest.raises(ValueError, match="at least one token"):
        engine.submit(Request([], 5, SamplingParams(), Collector()))
    with pytest.raises(ValueError, match="context length"):
        engine.submit(Request(list(range(64)), 5, SamplingParams(), Collector()))


def test_a_request_at_the_context_limit_finishes_with_length(engine):
    collector = Collector()
    engine.submit(Request(list(range(60)), 50, SamplingParams(), collector))
    assert collector.done.wait(30)
    assert len(collector.events) == 4 and collector.events[-1].finish_reason == "length"


STREAMS = [([1, 2, 3], 5), ([7, 8, 9, 10, 11], 6), ([42], 7), ([100, 200, 300, 400], 8)]  # (prompt, seed)


def four_streams(model, poison: Request | None = None) -> list[list[int]]:
    """The tokens of four seeded streams, on an engine that holds them all and the poison request, if any
    (submitted among them); every slot must be free again at the end."""
    engine = Engine(model, gpt2_tokenizer(), max_batch=5, max_queue=0)
    collectors = [Collector() for _ in STREAMS]
    for i, ((prompt, seed), collector) in enumerate(zip(STREAMS, collectors, strict=True)):
        engine.submit(Request(prompt, 12, SamplingParams(temperature=1.0, top_k=50), collector, seed=seed))
        if i == 1 and poison is not None:
            engine.submit(poison)
    engine.start()
    try:
        assert all(c.done.wait(30) for c in collectors)
        if poison is not None:
            assert poison.on_event.done.wait(30)
        deadline = time.monotonic() + 30
        while engine.load != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.load == (0, 0) and sorted(engine.free_slots) == list(range(5))  # every slot back
    finally:
        engine.stop()
    assert all(c.events[-1].finish_reason == "length" for c in collectors)
    return [c.tokens for c in collectors]


class BrokenClient(Collector):
    """A client whose callback fails on every token; a stubborn one fails on the error it is then told too."""

    def __init__(self, stubborn: bool):
        super().__init__()
        self.stubborn = stubborn

    def __call__(self, event):
        if isinstance(event, Exception):
            super().__call__(event)
        if self.stubborn or not isinstance(event, Exception):
            raise RuntimeError("the client broke")


@pytest.mark.parametrize("poison", ["seed", "sampling", "prefill", "callback", "stubborn callback"])
def test_a_poison_request_among_four_streams_fails_alone(model, monkeypatch, poison):
    alone = four_streams(model)
    params = SamplingParams(temperature=0.5)
    client = BrokenClient(poison == "stubborn callback") if "callback" in poison else Collector()
    victim = Request([666] * 5, 12, params, client, seed=2**70 if poison == "seed" else 1)
    if poison == "sampling":
        def sample(logits, sampling, *rest, **named):
            if sampling is params:
                raise RuntimeError("sampling broke")
            return next_token(logits, sampling, *rest, **named)

        monkeypatch.setattr("serving.engine.next_token", sample)
    if poison == "prefill":
        def logits(decoder, idx, slots=None):
            if idx.shape == (1, 5) and bool((idx == 666).all()):
                raise RuntimeError("prefill broke")
            return original(decoder, idx, slots)

        original = Decoder.logits
        monkeypatch.setattr(Decoder, "logits", logits)
    among = four_streams(model, victim)
    assert among == alone
    [error] = victim.on_event.events
    assert isinstance(error, Exception) and ("broke" in str(error) or "Overflow" in str(error))


def test_a_temperature_too_small_to_sample_from_is_greedy_among_four_streams(model):
    alone = four_streams(model)
    prompt = [5, 6, 7]
    cold = Request(prompt, 12, SamplingParams(temperature=1e-300, repetition_penalty=1e-300), Collector(), seed=1)
    among = four_streams(model, cold)
    assert among == alone
    expected = generate(model, torch.tensor([prompt]), 12, repetition_penalty=1e-300)[0, len(prompt):].tolist()
    assert cold.on_event.tokens == expected and cold.on_event.events[-1].finish_reason == "length"


def test_a_prompt_id_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(ValueError, match="token ids"):
        engine.submit(Request([1, CONFIG.vocab_size], 5, SamplingParams(), Collector()))


def sequences_of_one_prompt(engine, prompt, seeds, max_new_tokens=8, **options):
    """Submit one sequence per seed on the prompt, the later ones twins of the first; their collectors and
    requests."""
    collectors, requests = [], []
    for seed in seeds:
        collectors.append(Collector())
        requests.append(Request(prompt, max_new_tokens, SamplingParams(temperature=1.0), collectors[-1], seed=seed,
                                twin_of=requests[0] if requests else None, **options))
        engine.submit(requests[-1])
    for collector in collectors:
        assert collector.done.wait(30)
    return collectors, requests


def test_twins_prefill_their_prompt_once_and_sample_as_if_alone(model, monkeypatch):
    prefills = []
    original = Decoder.logits

    def counting(decoder, idx, slots=None):
        if idx.shape[1] > 1:
            prefills.append(idx.shape[1])
        return original(decoder, idx, slots)

    monkeypatch.setattr(Decoder, "logits", counting)
    engine = Engine(model, gpt2_tokenizer(), max_batch=3, max_queue=16).start()  # 3 slots for 4: one waits
    try:
        prompt = list(range(100, 140))
        alone = [sequences_of_one_prompt(engine, prompt, [seed])[0][0].tokens for seed in (1, 2, 3, 4)]
        prefills.clear()
        twins, _ = sequences_of_one_prompt(engine, prompt, [1, 2, 3, 4])
        assert [c.tokens for c in twins] == alone
        # the first prefilled it; the second and third copied it; the fourth, admitted once a slot was free,
        # copied it from the first (still running) or prefilled it itself
        assert sum(prefills) in (len(prompt), 2 * len(prompt))
    finally:
        engine.stop()


def test_a_twin_whose_first_is_aborted_prefills_itself(engine, model):
    prompt = [5, 6, 7, 8]
    first = Request(prompt, 8, SamplingParams(), Collector())
    first.abort()  # before it is admitted: it never prefills
    twin = Collector()
    engine.submit(first)
    engine.submit(Request(prompt, 8, SamplingParams(), twin, twin_of=first))
    assert twin.done.wait(30)
    assert twin.tokens == generate(model, torch.tensor([prompt]), 8)[0, len(prompt):].tolist()


def test_twins_scoring_their_prompt_share_its_scores(engine, model):
    prompt = list(range(300, 330))
    collectors, requests = sequences_of_one_prompt(engine, prompt, [1, 2], max_new_tokens=0, prompt_logprobs=2)
    assert [[(e.token_id, e.finish_reason) for e in c.events] for c in collectors] == [[(None, "length")]] * 2
    with torch.no_grad():
        own = torch.log_softmax(model(torch.tensor([prompt]))[0][0], dim=-1)
    expected = [own[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    for request in requests:
        assert [s.logprob for s in request.prompt_scores[1:]] == pytest.approx(expected, abs=1e-4)
        assert all(len(s.top_logprobs) == 2 for s in request.prompt_scores[1:])


def fresh_copy(model: GPT) -> GPT:
    """A model of the same weights (an engine's model is packed, which deepcopy cannot copy)."""
    twin = GPT(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.fixture(scope="module")
def lora_models(model):
    """Two random adapters over the model (their ranks and targets differ), each with the model it merges into."""
    return {name: random_adapter(fresh_copy(model), lora, seed) for seed, (name, lora) in enumerate(LORAS.items())}


def with_adapters(model, lora_models, **options) -> Engine:
    adapters = {name: adapter for name, (adapter, _) in lora_models.items()}
    return Engine(fresh_copy(model), gpt2_tokenizer(), adapters=adapters, **options)  # it adapts its model


def alone(model, prompt, max_new_tokens) -> list[int]:
    """The greedy tokens of one request, on an engine of its own."""
    engine = Engine(model, gpt2_tokenizer(), max_batch=2, max_queue=1).start()
    try:
        collector = Collector()
        engine.submit(Request(prompt, max_new_tokens, SamplingParams(), collector))
        assert collector.done.wait(30)
    finally:
        engine.stop()
    return collector.tokens


def test_requests_for_different_adapters_decode_together(model, lora_models, monkeypatch):
    monkeypatch.setattr("serving.engine.PREFILL_CHUNK", 8)  # the 20-token prompt is prefilled in three chunks
    engine = with_adapters(model, lora_models, max_batch=4, max_queue=0)
    assert engine.adapters == ("a", "b")
    jobs = [([1, 2, 3], "a", 10), (list(range(200, 220)), "b", 12), ([7, 8], None, 9), ([5, 6, 7, 8], "a", 11)]
    collectors = [Collector() for _ in jobs]
    for (prompt, adapter, n), collector in zip(jobs, collectors, strict=True):
        engine.submit(Request(prompt, n, SamplingParams(), collector, adapter=adapter))
    engine.start()
    try:
        assert all(c.done.wait(30) for c in collectors)
    finally:
        engine.stop()
    assert engine.decode_steps < sum(n for _, _, n in jobs)  # they shared decode steps
    for (prompt, adapter, n), collector in zip(jobs, collectors, strict=True):
        merged = model if adapter is None else lora_models[adapter][1]
        assert collector.tokens == alone(merged, prompt, n)
    assert collectors[1].tokens != alone(model, jobs[1][0], jobs[1][2])  # the adapter changed what it says


def test_a_prompt_is_scored_through_its_adapter(model, lora_models):
    engine = with_adapters(model, lora_models, max_batch=2).start()
    try:
        prompt = list(range(300, 320))
        request = engine.submit(Request(prompt, 0, SamplingParams(), Collector(), adapter="b", prompt_logprobs=1))
        assert request.on_event.done.wait(30)
    finally:
        engine.stop()
    with torch.no_grad():
        own = torch.log_softmax(lora_models["b"][1](torch.tensor([prompt]))[0][0], dim=-1)
    expected = [own[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    assert [s.logprob for s in request.prompt_scores[1:]] == pytest.approx(expected, abs=1e-4)


def test_an_unknown_adapter_is_refused(engine, model, lora_models):
    with pytest.raises(ValueError, match="no adapter named 'a'; this model has no adapters"):
        engine.submit(Request([1], 5, SamplingParams(), Collector(), adapter="a"))
    served = with_adapters(model, lora_models, max_batch=2)  # not started: nothing runs
    with pytest.raises(ValueError, match="no adapter named 'c'; this model has: a, b"):
        served.submit(Request([1], 5, SamplingParams(), Collector(), adapter="c"))
    first = served.submit(Request([1, 2], 5, SamplingParams(), Collector(), adapter="a"))
    with pytest.raises(ValueError, match="adapters differ"):
        served.submit(Request([1, 2], 5, SamplingParams(), Collector(), adapter="b", twin_of=first))
