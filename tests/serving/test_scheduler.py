"""Continuous batching under KV pressure: preemption and chunked prefill never change greedy output."""

import torch

from serving.config import EngineConfig
from serving.engine import Engine
from serving.sampling import SamplingParams
from tests.serving.conftest import tiny_target


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (int(torch.randint(4, 60, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def test_64_requests_with_a_quarter_of_the_kv_they_need():
    _, target = tiny_target()
    prompts = _prompts(64)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    alone_engine = Engine(EngineConfig(max_total_tokens=4096, disable_radix_cache=True), target)
    alone = [alone_engine.generate([p], params)[0].output_ids for p in prompts]

    need = sum(len(p) + 32 for p in prompts)
    engine = Engine(EngineConfig(max_total_tokens=need // 4, max_running_requests=64), target)
    reqs = engine.generate(prompts, params)
    assert [r.finish_reason for r in reqs] == ["length"] * 64
    assert [r.output_ids for r in reqs] == alone
    assert engine.num_preemptions > 0
    assert engine.allocator.num_free + engine.tree_cache.evictable_size == engine.allocator.capacity


def test_chunked_prefill_matches_whole_prefill():
    _, target = tiny_target()
    prompts = _prompts(6, seed=3) + [list(range(200))]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    whole = Engine(EngineConfig(max_total_tokens=4096, chunked_prefill_size=4096), target).generate(prompts, params)
    chunked = Engine(EngineConfig(max_total_tokens=4096, chunked_prefill_size=7), target).generate(prompts, params)
    assert [r.output_ids for r in chunked] == [r.output_ids for r in whole]


def test_prefix_cache_reuses_kv_and_keeps_output():
    _, target = tiny_target()
    engine = Engine(EngineConfig(max_total_tokens=4096), target)
    shared = list(range(1, 120))
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    first = engine.generate([shared + [5, 6]], params)[0]
    second = engine.generate([shared + [7, 8]], params)[0]
    assert first.cached_tokens == 0
    assert second.cached_tokens == len(shared)
    fresh = Engine(EngineConfig(max_total_tokens=4096, disable_radix_cache=True), target)
    assert second.output_ids == fresh.generate([shared + [7, 8]], params)[0].output_ids
