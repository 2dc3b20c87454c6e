import pytest
import torch

from serving.config import EngineConfig
from serving.engine import Engine
from serving.sampling import InvalidRequest, SamplingParams, processed_probs, sample
from tests.serving.conftest import tiny_target


def test_processed_probs_masks():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    top_k = processed_probs(logits, [SamplingParams(top_k=2)])
    assert torch.allclose(top_k, torch.tensor([[2 / 3, 1 / 3, 0, 0]]))
    top_p = processed_probs(logits, [SamplingParams(top_p=0.8)])  # 0.5 + 0.25 < 0.8: the third token is needed
    assert torch.allclose(top_p, torch.tensor([[0.5, 0.25, 0.15, 0]]) / 0.9)
    min_p = processed_probs(logits, [SamplingParams(min_p=0.4)])  # keep p >= 0.2
    assert torch.allclose(min_p, torch.tensor([[0.5, 0.25, 0, 0]]) / 0.75)
    hot = processed_probs(logits, [SamplingParams(temperature=2.0)])
    expected = torch.softmax(logits / 2.0, -1)
    assert torch.allclose(hot, expected)


def test_sample_matches_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probs).expand(20000, 4).clone()
    torch.manual_seed(0)
    tokens = sample(logits, [SamplingParams(temperature=1.0)] * 20000, [0] * 20000)
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    assert torch.allclose(freq, probs, atol=0.015)
    assert freq[3] == 0


def test_seeded_sampling_is_reproducible_across_batches():
    _, target = tiny_target()
    engine = Engine(EngineConfig(max_total_tokens=2048), target)
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = engine.generate([[1, 2, 3]], seeded)[0].output_ids
    others = [SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)] * 3
    mixed = engine.generate([[5, 6], [1, 2, 3], [9], [7, 7, 7]], [others[0], seeded, others[1], others[2]])
    assert mixed[1].output_ids == alone
    different = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))[
        0
    ].output_ids
    assert different != alone


def test_stop_conditions():
    _, target = tiny_target()
    engine = Engine(EngineConfig(max_total_tokens=2048), target)
    greedy = engine.generate([[4, 5, 6]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    ids = greedy.output_ids
    assert len(ids) == 20 and greedy.finish_reason == "length"
    # A stop token id ends the output there (the token is kept in ids, as EOS is).
    stop_id = ids[5]
    first = ids.index(stop_id)
    r = engine.generate([[4, 5, 6]], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_id]))[0]
    assert r.output_ids == ids[: first + 1] and r.finish_reason == "stop"
    # EOS stops unless ignore_eos.
    eos_engine = Engine(EngineConfig(max_total_tokens=2048), target)
    eos_engine.eos_token_ids = frozenset([stop_id])
    r = eos_engine.generate([[4, 5, 6]], SamplingParams(max_tokens=20, temperature=0))[0]
    assert r.output_ids == ids[: first + 1] and r.finish_reason == "stop"
    # A stop string cuts the text before it.
    text = greedy.text
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    r = engine.generate([[4, 5, 6]], SamplingParams(max_tokens=20, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert r.finish_reason == "stop" and r.text == text[: text.index(stop)]


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"n": 17}, "n"),
        ({"top_k": 0}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_params_name_the_field(kwargs, param):
    with pytest.raises(InvalidRequest) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
