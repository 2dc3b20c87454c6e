"""Continuous batching under KV pressure: preemption and chunked prefill never change greedy output."""

import pytest
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


def _token_stop_params(target, prompts):
    """Params whose stop conditions land inside a run of continuous steps: EOS-like stop ids and max_tokens."""
    plain = Engine(EngineConfig(max_total_tokens=8192), target).generate(
        prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    )
    params = []
    for i, r in enumerate(plain):
        if i % 3 == 0:
            params.append(SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[r.output_ids[5]]))
        elif i % 3 == 1:
            params.append(SamplingParams(max_tokens=7 + i, temperature=0, ignore_eos=True))
        else:
            params.append(SamplingParams(max_tokens=24, temperature=0.8, seed=i, ignore_eos=True))
    return params


def test_continuous_decode_steps_keep_outputs_and_free_every_slot():
    _, target = tiny_target()
    prompts = _prompts(12, seed=5)
    params = _token_stop_params(target, prompts)
    one = Engine(EngineConfig(max_total_tokens=8192, num_continuous_decode_steps=1), target)
    want = [(r.output_ids, r.finish_reason) for r in one.generate(prompts, params)]
    for k in (3, 8):
        engine = Engine(EngineConfig(max_total_tokens=8192, num_continuous_decode_steps=k), target)
        got = engine.generate(prompts, params)
        assert [(r.output_ids, r.finish_reason) for r in got] == want
        assert engine.allocator.num_free + engine.tree_cache.evictable_size == engine.allocator.capacity
        # Each request's cached KV must be its own tokens': a second run served from the cache agrees.
        again = engine.generate(prompts, params)
        assert [(r.output_ids, r.finish_reason) for r in again] == want
        assert all(r.cached_tokens > 0 for r in again)
    stop_at = [r.finish_reason for r in one.generate(prompts, params)]
    assert "stop" in stop_at and "length" in stop_at


def test_continuous_decode_under_kv_pressure_falls_back_and_preempts():
    _, target = tiny_target()
    prompts = _prompts(24, seed=6)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = [r.output_ids for r in Engine(EngineConfig(max_total_tokens=8192), target).generate(prompts, params)]
    need = sum(len(p) + 20 for p in prompts)
    engine = Engine(
        EngineConfig(max_total_tokens=need // 3, max_running_requests=24, num_continuous_decode_steps=8), target
    )
    assert [r.output_ids for r in engine.generate(prompts, params)] == want
    assert engine.num_preemptions > 0
    assert engine.allocator.num_free + engine.tree_cache.evictable_size == engine.allocator.capacity


def test_unstreamed_request_hears_once_with_the_whole_text():
    """stream=False: one event, at the end, whose text equals the streamed request's concatenated deltas, stop
    strings included (they are still found while decoding)."""
    _, target = tiny_target()
    prompts = _prompts(4, seed=8)
    base = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = Engine(EngineConfig(max_total_tokens=8192), target).generate(prompts, base)
    stop_text = plain[1].text[4:9]  # lands inside the output: cuts it there
    params = [base, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop=[stop_text]), base, base]
    for k in (1, 8):
        engine = Engine(EngineConfig(max_total_tokens=8192, num_continuous_decode_steps=k), target)
        events = {True: [[] for _ in prompts], False: [[] for _ in prompts]}
        reqs = []
        for stream in (True, False):
            for i, (p, sp) in enumerate(zip(prompts, params)):
                reqs.append(engine.submit(p, sp, events[stream][i].append, stream=stream))
        while not all(r.finished for r in reqs):
            engine.step()
        for i in range(len(prompts)):
            streamed, once = events[True][i], events[False][i]
            assert len(once) == 1 and once[0].finished and len(streamed) > 1
            assert once[0].text_delta == "".join(e.text_delta for e in streamed)
            assert once[0].token_ids == [t for e in streamed for t in e.token_ids]
            assert once[0].finish_reason == streamed[-1].finish_reason
        assert events[False][1][0].finish_reason == "stop"
        assert stop_text not in events[False][1][0].text_delta
        assert events[False][0][0].text_delta == plain[0].text


def test_greedy_steps_on_fixed_buffers_with_a_padded_bucket():
    """The K greedy steps that one CUDA graph captures, run eagerly on their fixed buffers (Triton kernels in the
    interpreter): 3 requests in a bucket of 4 (a padded request on row 0 / slot 0), same tokens as one step at a
    time, and the padding never touches a real request's KV or table row."""
    from serving.cuda_graph_runner import GreedyStepsGraphRunner

    _, target = tiny_target(layers=1)  # the interpreter runs every attention program: keep it small
    prompts = _prompts(3, seed=12)
    params = SamplingParams(max_tokens=11, temperature=0, ignore_eos=True)
    want = Engine(EngineConfig(max_total_tokens=4096, num_continuous_decode_steps=1), target).generate(prompts, params)
    engine = Engine(
        EngineConfig(max_total_tokens=4096, attention_backend="triton", num_continuous_decode_steps=4), target
    )
    runner = engine.runner
    runner.steps_graph = GreedyStepsGraphRunner(runner, max_bs=8, steps=4, capture=False)
    calls = []
    run = runner.steps_graph.run
    runner.steps_graph.run = lambda rows, *a: calls.append(rows.shape[0]) or run(rows, *a)
    got = engine.generate(prompts, params)
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    assert calls == [3, 3]  # the 2-token tail (11 = 1 + 2 * 4 + 2) ran as single steps
    assert engine.allocator.num_free + engine.tree_cache.evictable_size == engine.allocator.capacity


@pytest.mark.gpu
def test_greedy_steps_cuda_graph_matches_single_steps():
    """On the GPU: runs of 8 greedy steps replayed from one CUDA graph (3 requests in a bucket of 4) give the tokens
    of single-step graph replays."""
    _, target = tiny_target()
    prompts = _prompts(3, seed=13)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = {}
    for k in (1, 8):
        engine = Engine(EngineConfig(max_total_tokens=4096, num_continuous_decode_steps=k), target)
        outs[k] = [r.output_ids for r in engine.generate(prompts, params)]
        if k == 8:
            assert engine.runner.steps_graph.graphs and not engine.runner.steps_graph.failed
    assert outs[8] == outs[1]


def test_attention_precise_pv_flag_reaches_both_kernels(monkeypatch):
    """--attention-precise-pv (off by default) is handed to the Triton decode and extend kernels of the target;
    the outputs still match the torch backend's (fp32 on CPU)."""
    from serving.attention import triton_backend
    from serving.cli import build_parser

    for argv, want_precise in (([], False), (["--attention-precise-pv"], True)):
        parser = build_parser()
        flags = ["--attention-backend", "triton", "--max-total-tokens", "4096", "--num-continuous-decode-steps", "1"]
        cfg = EngineConfig.from_cli_args(parser.parse_args([*argv, *flags]))
        assert cfg.attention_precise_pv is want_precise
        seen = []
        for name in ("decode_attention", "extend_attention"):
            kernel = getattr(triton_backend, name)

            def record(*a, _kernel=kernel, _name=name, _seen=seen, **kw):
                _seen.append((_name, kw["precise_pv"]))
                return _kernel(*a, **kw)

            monkeypatch.setattr(triton_backend, name, record)
        _, target = tiny_target(layers=1)
        prompts = _prompts(2, seed=5)
        params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
        got = Engine(cfg, target).generate(prompts, params)
        want = Engine(EngineConfig(max_total_tokens=4096, num_continuous_decode_steps=1), target).generate(
            prompts, params
        )
        assert [r.output_ids for r in got] == [r.output_ids for r in want]
        assert {n for n, _ in seen} == {"decode_attention", "extend_attention"}
        assert all(p is want_precise for _, p in seen)
        monkeypatch.undo()
