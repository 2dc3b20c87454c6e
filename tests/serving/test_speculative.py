"""EAGLE-3 speculative decoding: lossless greedy and sampling, checkpoint loading, engine features."""

import math

import httpx
import pytest
import torch
from safetensors.torch import save_file

from serving.config import EngineConfig
from serving.engine import Engine
from serving.sampling import SamplingParams
from specbundle import DraftConfig, Eagle3DraftModel
from specbundle.checkpoint import save_draft
from tests.serving.conftest import tiny_target

CHAIN = dict(speculative_num_steps=3, speculative_eagle_topk=1, speculative_num_draft_tokens=4)
TREE = dict(speculative_num_steps=5, speculative_eagle_topk=4, speculative_num_draft_tokens=16)
SMALL_TREE = dict(speculative_num_steps=4, speculative_eagle_topk=2, speculative_num_draft_tokens=8)


def make_draft(hf, folder, draft_vocab=None, seed=0, sharpen=1.0):
    torch.manual_seed(seed)
    cfg = DraftConfig.for_target(hf.config, draft_vocab_size=draft_vocab)
    draft = Eagle3DraftModel(cfg)
    vocab = hf.config.vocab_size
    if draft_vocab:
        # Draft vocabulary: every other target id.
        ids = torch.arange(draft_vocab) * (vocab // draft_vocab)
        draft.d2t.copy_(ids - torch.arange(draft_vocab))
        draft.t2d.zero_()
        draft.t2d[ids] = True
    with torch.no_grad():
        draft.lm_head.weight.mul_(sharpen)
    save_draft(draft, folder, dtype=torch.float32)
    return folder


def sharpen_target(hf, factor):
    with torch.no_grad():
        hf.lm_head.weight.mul_(factor)
    return hf


def prompts_for(vocab, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist() for _ in range(n)
    ]


def plain_reference(tmp_path, vocab, layers, num_prompts, seed, max_tokens, max_total_tokens):
    """A tiny target, a random draft for it, prompts, greedy params, and the plain engine's outputs to match."""
    hf, target = tiny_target(vocab=vocab, layers=layers)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=vocab // 2)
    prompts = prompts_for(vocab, num_prompts, seed=seed)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    plain = Engine(EngineConfig(max_total_tokens=max_total_tokens), target).generate(prompts, params)
    return target, draft, prompts, params, plain


@pytest.mark.parametrize("vocab", [8, 256])
@pytest.mark.parametrize("shape", ["chain", "tree"])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_is_lossless(tmp_path, vocab, shape, batch):
    hf, target = tiny_target(vocab=vocab, layers=6)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=vocab // 2)
    prompts = prompts_for(vocab, 8)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    plain = Engine(EngineConfig(max_total_tokens=4096), target).generate(prompts, params)
    spec_cfg = EngineConfig(
        max_total_tokens=4096,
        max_running_requests=batch,
        speculative_draft_model_path=str(draft),
        disable_speculative_adaptive=True,  # exercise the speculative path on every step
        **(CHAIN if shape == "chain" else TREE),
    )
    engine = Engine(spec_cfg, target)
    spec = engine.generate(prompts, params)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    steps = sum(r.spec.num_verify_steps for r in spec)
    accepted = sum(r.spec.num_accepted_tokens for r in spec)
    assert steps > 0
    assert sum(len(r.output_ids) for r in spec) <= steps + accepted + len(spec)  # prefill gives each request one
    if vocab == 8 and shape == "tree":
        assert accepted > steps * 0.5  # 4 children out of 8 tokens: many drafts hit; the accept path is exercised
    assert engine.allocator.num_free + engine.tree_cache.evictable_size == engine.allocator.capacity


def test_spec_under_kv_pressure_chunking_and_prefix_cache(tmp_path):
    hf, target = tiny_target(vocab=8, layers=6)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    shared = prompts_for(8, 1, seed=5)[0] * 4
    prompts = [shared + p for p in prompts_for(8, 16, seed=1)]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    plain = Engine(EngineConfig(max_total_tokens=8192, disable_radix_cache=True), target).generate(prompts, params)
    # Prompts are short next to the output: admitted requests outgrow the pool and must be preempted.
    room_for_three = 3 * (max(len(p) for p in prompts) + 48 + 16)
    engine = Engine(
        EngineConfig(
            max_total_tokens=room_for_three,
            chunked_prefill_size=16,
            max_running_requests=16,
            speculative_draft_model_path=str(draft),
            disable_speculative_adaptive=True,  # exercise the speculative path on every step
            **TREE,
        ),
        target,
    )
    spec = engine.generate(prompts, params)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert engine.num_preemptions > 0
    assert any(r.cached_tokens > 0 for r in spec)
    again = engine.generate(prompts[:4], params)  # served from the prefix cache now
    assert [r.output_ids for r in again] == [r.output_ids for r in plain[:4]]
    assert all(r.cached_tokens > 0 for r in again)


def test_adaptive_plain_turn_pays_no_draft_forward_and_stays_in_the_prefix_cache(tmp_path):
    """Adaptive mode decoding plainly runs no draft forward, not even over the prompt; the tokens it decodes still
    enter the prefix cache (their aux states are stored by slot), and a later turn that speculates catches the draft
    up over them and drafts exactly as an engine without the cache does."""
    hf, target = tiny_target(vocab=8, layers=6)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    first = prompts_for(8, 1, seed=3)[0]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    reference = Engine(EngineConfig(max_total_tokens=2048), target)
    ref1 = reference.generate([first], params)[0]
    second = first + ref1.output_ids + [1, 2, 3]
    ref2 = reference.generate([second], params)[0]
    runs = {}
    for cache in (True, False):
        engine = Engine(
            EngineConfig(
                max_total_tokens=2048, speculative_draft_model_path=str(draft), disable_radix_cache=not cache, **TREE
            ),
            target,
        )
        worker = engine.spec_worker
        extends = []
        draft_extend = worker._draft_extend
        worker._draft_extend = lambda *a, log=extends, fn=draft_extend: log.append(len(a[0])) or fn(*a)
        worker.should_speculate = lambda batch_size: False
        turn1 = engine.generate([first], params)[0]
        assert not extends
        worker.should_speculate = lambda batch_size: True
        turn2 = engine.generate([second], params)[0]
        assert extends
        assert turn1.output_ids == ref1.output_ids and turn2.output_ids == ref2.output_ids
        runs[cache] = turn2
        assert engine.allocator.num_free + engine.tree_cache.evictable_size == engine.allocator.capacity
    # turn 1 leaves its prompt and 23 of its 24 tokens with KV; a speculative match gives back the last position.
    assert runs[True].cached_tokens == len(first) + len(ref1.output_ids) - 2
    assert runs[False].cached_tokens == 0
    assert runs[True].spec.num_verify_steps > 0
    assert runs[True].spec.num_accepted_tokens == runs[False].spec.num_accepted_tokens
    assert runs[True].spec.num_verify_steps == runs[False].spec.num_verify_steps


def test_eos_stop_strings_and_max_tokens_inside_an_accepted_run(tmp_path):
    hf, target = tiny_target(vocab=8, layers=6)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    prompts = prompts_for(8, 6, seed=2)
    plain_engine = Engine(EngineConfig(max_total_tokens=4096), target)
    spec_engine = Engine(
        EngineConfig(
            max_total_tokens=4096,
            speculative_draft_model_path=str(draft),
            disable_speculative_adaptive=True,  # exercise the speculative path on every step
            **TREE,
        ),
        target,
    )
    for engine in (plain_engine, spec_engine):
        engine.eos_token_ids = frozenset([3])
    for params in (
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0),
        SamplingParams(max_tokens=30, temperature=0, stop=[" 5 1"], ignore_eos=True),
        SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[6], ignore_eos=True),
    ):
        plain = plain_engine.generate(prompts, params)
        spec = spec_engine.generate(prompts, params)
        assert [(r.output_ids, r.text, r.finish_reason) for r in spec] == [
            (r.output_ids, r.text, r.finish_reason) for r in plain
        ]


def _exact_two_token_distribution(hf, prompt, temperature):
    with torch.no_grad():
        first = torch.softmax(hf(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        vocab = first.numel()
        joint = torch.zeros(vocab, vocab, dtype=torch.float64)
        for t in range(vocab):
            second = torch.softmax(hf(torch.tensor([prompt + [t]])).logits[0, -1] / temperature, -1)
            joint[t] = first[t].double() * second.double()
    return joint.flatten()


def _chi_square(counts, probs, min_expected=5.0):
    """Pearson statistic over cells with enough expected mass (the rest pooled); returns (stat, dof)."""
    n = counts.sum()
    expected = probs * n
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    return float(((obs - exp) ** 2 / exp).sum()), int(keep.sum()) - 1


def _critical(dof, z=3.09):
    """Upper 0.1% point of chi-square(dof), Wilson-Hilferty approximation."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_sampling_keeps_the_target_distribution(tmp_path):
    from serving.models.loader import target_from_hf_model
    from tests.serving.conftest import IdTokenizer

    hf, _ = tiny_target(vocab=8, layers=4, seed=3)
    sharpen_target(hf, 6.0)  # peaked enough to be far from uniform, flat enough for ~60 populated cells
    target = target_from_hf_model(hf, IdTokenizer())
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=8, seed=7, sharpen=30.0)
    prompt = [1, 5, 2]
    probs = _exact_two_token_distribution(hf, prompt, temperature=1.0)
    engine = Engine(
        EngineConfig(
            max_total_tokens=65536,
            max_running_requests=128,
            speculative_max_batch_size=128,
            disable_speculative_adaptive=True,  # every second token must come from the verifier
            speculative_draft_model_path=str(draft),
            **TREE,
        ),
        target,
    )
    n = 4000

    def draw():
        params = [SamplingParams(max_tokens=2, temperature=1.0, seed=i, ignore_eos=True) for i in range(n)]
        counts = torch.zeros(64, dtype=torch.float64)
        reqs = engine.generate([prompt] * n, params)
        assert all(r.spec.num_verify_steps == 1 for r in reqs)  # the second token always came from a verify step
        for r in reqs:
            counts[r.output_ids[0] * 8 + r.output_ids[1]] += 1
        return counts

    stat, dof = _chi_square(draw(), probs)
    assert stat < _critical(dof), (stat, dof)

    # A sampler that trusts the draft (always accepts the first child) must be caught by the same test.
    worker = engine.spec_worker
    honest = worker._verify_sampling

    def trusting(candidates, r_index, r_next, r_sib, draft_probs, target_probs, coins, final, num_spec):
        first_child = r_next.clamp_min(0)
        agree = torch.where(r_next >= 0, candidates.gather(1, first_child), target_probs.argmax(-1))
        return worker._verify_greedy(candidates, r_index, r_next, r_sib, agree, num_spec)

    worker._verify_sampling = trusting
    try:
        biased = draw()
    finally:
        worker._verify_sampling = honest
    stat_b, dof_b = _chi_square(biased, probs)
    assert stat_b > _critical(dof_b), (stat_b, dof_b)


def test_specforge_layout_checkpoint_loads_and_bad_ones_are_named(tmp_path):
    hf, target = tiny_target(vocab=256, layers=6)
    cfg = hf.config
    h, inter, heads, kv, hd = cfg.hidden_size, cfg.intermediate_size, 4, 2, 16
    dv = 64
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": h,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_hidden_layers": 1,
        "vocab_size": 256,
        "draft_vocab_size": dv,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "target_hidden_size": h,
    }
    g = torch.Generator().manual_seed(0)
    w = {
        "fc.weight": (h, 3 * h),
        "midlayer.self_attn.q_proj.weight": (heads * hd, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv * hd, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv * hd, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, heads * hd),
        "midlayer.mlp.gate_proj.weight": (inter, h),
        "midlayer.mlp.up_proj.weight": (inter, h),
        "midlayer.mlp.down_proj.weight": (h, inter),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
        "lm_head.weight": (dv, h),
    }
    state = {k: torch.randn(*s, generator=g) * 0.05 for k, s in w.items()}
    ids = torch.arange(dv) * 4
    state["d2t"] = ids - torch.arange(dv)
    t2d = torch.zeros(256, dtype=torch.bool)
    t2d[ids] = True
    state["t2d"] = t2d

    def write(folder, st, conf):
        import json

        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(conf))
        save_file(st, str(folder / "model.safetensors"))
        return str(folder)

    good = write(tmp_path / "good", state, config)
    engine = Engine(EngineConfig(max_total_tokens=2048, speculative_draft_model_path=good, **CHAIN), target)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    out = engine.generate([[1, 2, 3]], params)[0]
    plain = Engine(EngineConfig(max_total_tokens=2048), target).generate([[1, 2, 3]], params)[0]
    assert out.output_ids == plain.output_ids and out.spec.num_verify_steps > 0

    missing = dict(state)
    del missing["midlayer.mlp.up_proj.weight"]
    bad_shape = dict(state)
    bad_shape["fc.weight"] = torch.zeros(h, 2 * h)
    wide = dict(state)
    wide["fc.weight"] = torch.randn(h, 3 * 2 * h, generator=g) * 0.05
    cases = {
        "missing": (write(tmp_path / "missing", missing, config), "midlayer.mlp.up_proj.weight"),
        "shape": (write(tmp_path / "shape", bad_shape, config), "fc.weight"),
        # Self-consistent, but made for a target twice as wide as this one.
        "hidden": (write(tmp_path / "hidden", wide, {**config, "target_hidden_size": 2 * h}), "target_hidden_size"),
    }
    for name, (folder, needle) in cases.items():
        with pytest.raises(ValueError) as e:  # DraftConfigError, or BundleError wrapping it
            Engine(EngineConfig(max_total_tokens=2048, speculative_draft_model_path=folder, **CHAIN), target)
        assert needle in str(e.value), (name, str(e.value))


def test_server_reports_spec_decoding_and_metrics(tmp_path):
    from tests.serving.server_utils import RunningServer

    hf, target = tiny_target(vocab=8, layers=6)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    engine = Engine(
        EngineConfig(
            max_total_tokens=4096, speculative_draft_model_path=str(draft), disable_speculative_adaptive=True, **TREE
        ),
        target,
    )  # every step speculates: the figures below must come from verify steps
    with RunningServer(engine) as server:
        r = httpx.post(
            server.url + "/v1/completions",
            json={
                "model": engine.model_name,
                "prompt": [1, 2, 3],
                "max_tokens": 32,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        body = r.json()
        spec = body["spec_decoding"]
        assert set(spec) == {"accept_length", "num_verify_steps", "num_draft_tokens", "num_accepted_tokens"}
        assert spec["num_draft_tokens"] == spec["num_verify_steps"] * 15
        assert spec["accept_length"] == pytest.approx(
            (spec["num_accepted_tokens"] + spec["num_verify_steps"]) / spec["num_verify_steps"], abs=1e-3
        )
        metrics = httpx.get(server.url + "/metrics").text
        for name in (
            "spec_accept_length",
            "spec_accept_rate",
            "spec_accepted_tokens_per_position_total",
            "time_to_first_token_seconds",
            "inter_token_latency_seconds",
            "e2e_request_latency_seconds",
        ):
            assert name in metrics
        value = [float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("spec_accept_length ")]
        assert value and value[0] > 1.0


def test_adaptive_policy_follows_the_measured_rates(tmp_path):
    from serving.speculative.eagle_worker import CUT_AFTER, PROBE_EVERY, PROBE_LEN, PROBE_MAX, PROBE_SHARE

    hf, target = tiny_target(vocab=8, layers=4)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    engine = Engine(EngineConfig(max_total_tokens=2048, speculative_draft_model_path=str(draft), **CHAIN), target)
    worker = engine.spec_worker

    def run(n, spec_tokens, plain_tokens=4, batch=1):
        out = []
        for _ in range(n):
            out.append(worker.should_speculate(batch))
            worker.record(out[-1], batch, tokens=spec_tokens if out[-1] else plain_tokens, seconds=1.0)
        return out

    # Nothing measured: PROBE_LEN iterations of plain decoding, then PROBE_LEN of speculation after a first one that
    # is not counted (it also pays the draft's catch-up); at half plain's rate: slower, but not clearly enough to cut
    # the window short.
    assert run(2 * PROBE_LEN + 1, spec_tokens=2) == [False] * PROBE_LEN + [True] * (PROBE_LEN + 1)
    assert not worker.should_speculate(1)  # plain is faster
    choices = run(2 * PROBE_EVERY, spec_tokens=2)
    assert sum(choices) == PROBE_LEN  # mostly plain, with one probe of PROBE_LEN speculative iterations
    choices += run(60000, spec_tokens=2)
    starts = [i for i, c in enumerate(choices) if c and (i == 0 or not choices[i - 1])]
    assert all(choices[i : i + PROBE_LEN] == [True] * PROBE_LEN for i in starts)  # each probe is PROBE_LEN long
    # While speculation keeps losing, the gap doubles, and is long enough from the start that a probe (8 iterations
    # of 1 s committing 16 tokens, where plain decoding commits them in 4 s: 4 s lost) costs PROBE_SHARE of the time.
    gaps = [b - a - PROBE_LEN for a, b in zip(starts, starts[1:])]
    budget = round(4.0 / PROBE_SHARE)
    assert gaps[0] == budget and gaps[1] == 2 * budget and gaps[2] == 4 * budget
    assert gaps[-1] == PROBE_MAX and len(gaps) <= 8
    assert 0.5 * sum(choices) <= PROBE_SHARE * len(choices)  # a speculative iteration loses 0.5 s here
    for _ in range(3):  # speculation becomes the faster mode (seen by a probe): follow it, and probe plain often
        worker.record(True, 1, tokens=40, seconds=1.0)
    assert worker.should_speculate(1)
    later = run(2 * PROBE_EVERY, spec_tokens=40)
    assert later.count(False) == PROBE_LEN
    # A single lucky or unlucky iteration does not flip the choice: the rates are smoothed over several.
    assert run(1, spec_tokens=0) == [True] and worker.should_speculate(1)
    run(PROBE_LEN, spec_tokens=9, plain_tokens=2, batch=2)
    run(PROBE_LEN, spec_tokens=9, plain_tokens=2, batch=2)
    assert worker.should_speculate(2)  # batch-size buckets are measured separately
    assert not worker.should_speculate(1000)  # above --speculative-max-batch-size
    fresh = Engine(EngineConfig(max_total_tokens=2048, speculative_draft_model_path=str(draft), **CHAIN), target)
    worker = fresh.spec_worker
    for _ in range(PROBE_LEN + 1):
        worker.record(True, 4, tokens=2, seconds=1.0)
    for _ in range(PROBE_LEN):
        worker.record(False, 4, tokens=8, seconds=1.0)  # speculation lost at batch 4
    assert not worker.should_speculate(16) and not worker.should_speculate(8)  # larger, unmeasured: start plain
    for _ in range(PROBE_LEN):
        worker.record(False, 16, tokens=30, seconds=1.0)
    assert not worker.should_speculate(16)  # ... and stay plain while the smaller batch says so
    run(PROBE_LEN, spec_tokens=9, batch=2)
    assert worker.should_speculate(2)  # smaller batches are still tried once plain is measured there
    for _ in range(2):  # speculation now wins at batch 4 (a window's first iteration is not counted)
        worker.record(True, 4, tokens=200, seconds=1.0)
    assert worker.should_speculate(16)
    # A clear loss (here a quarter of plain's rate) ends a speculative window after its first iteration and
    # CUT_AFTER more, both the first measurement and every probe.
    clear = Engine(EngineConfig(max_total_tokens=2048, speculative_draft_model_path=str(draft), **CHAIN), target)
    worker = clear.spec_worker
    choices = run(PROBE_LEN + 2 * PROBE_EVERY + round(3 / PROBE_SHARE), spec_tokens=1)
    window = [True] * (1 + CUT_AFTER)
    assert choices[: PROBE_LEN + len(window) + 1] == [False] * PROBE_LEN + window + [False]
    starts = [i for i, c in enumerate(choices) if c and not choices[i - 1]]
    assert len(starts) >= 2 and all(choices[i : i + len(window) + 1] == window + [False] for i in starts)
    forced = Engine(
        EngineConfig(
            max_total_tokens=2048, speculative_draft_model_path=str(draft), disable_speculative_adaptive=True, **CHAIN
        ),
        target,
    ).spec_worker
    forced.record(True, 1, tokens=1, seconds=10.0)
    forced.record(False, 1, tokens=10, seconds=1.0)
    assert forced.should_speculate(1)


def test_adaptive_policy_probes_when_a_request_joins(tmp_path):
    """New text changes acceptance: a request that joins starts a probe of losing speculation early, but only once
    PROBE_SHARE of the time since the last probe pays for one."""
    from serving.speculative.eagle_worker import PROBE_LEN, PROBE_SHARE

    hf, target = tiny_target(vocab=8, layers=4)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    worker = Engine(EngineConfig(max_total_tokens=2048, speculative_draft_model_path=str(draft), **CHAIN), target)
    worker = worker.spec_worker

    def step(joined=False):
        worker._joined = joined  # what after_prefill sets when a request finishes its prefill
        spec = worker.should_speculate(1)
        worker.record(spec, 1, tokens=2 if spec else 4, seconds=1.0)  # speculation at half plain's rate
        return spec

    choices = [step() for _ in range(3000)]
    ends = [i for i in range(1, len(choices)) if choices[i - 1] and not choices[i]]
    gap = round(4.0 / PROBE_SHARE)  # a probe loses 4 s (16 tokens in 8 s, plain needs 4 s)
    assert [b - a for a, b in zip(ends[1:], ends[2:])][:2] == [gap + PROBE_LEN, 2 * gap + PROBE_LEN]
    since = len(choices) - ends[-1]  # plain iterations since the last probe ended; the next is 4 gaps away
    assert since < gap
    for _ in range(gap - since):
        assert not step(joined=True)  # too soon after the last probe
    assert step(joined=True)  # a join one gap after the last probe starts a probe
    assert all(step() for _ in range(PROBE_LEN - 1)) and not step()


def test_iterations_that_capture_a_cuda_graph_are_not_rate_samples(tmp_path, monkeypatch):
    """A graph capture (a new batch or prefix-width bucket) costs far more than the iteration it serves: the
    adaptive policy must not take it for that mode's speed."""
    from serving import cuda_graph_runner

    hf, target = tiny_target(vocab=8, layers=4)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    engine = Engine(EngineConfig(max_total_tokens=2048, speculative_draft_model_path=str(draft), **CHAIN), target)
    recorded, iterations = [], []
    monkeypatch.setattr(engine.spec_worker, "record", lambda *args: recorded.append(len(iterations)))
    decode_step = engine._decode_step

    def step():
        iterations.append(None)
        if len(iterations) in (2, 5):
            cuda_graph_runner.captures += 1  # what capture_graph counts
        return decode_step()

    monkeypatch.setattr(engine, "_decode_step", step)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert len(iterations) == 7  # one token from the prefill, then one per plain decode step
    assert recorded == [1, 3, 4, 6, 7]


def test_adaptive_policy_costs_little_where_speculation_loses(tmp_path):
    """The H200 batch-1 regime of docs/benchmarks.md, simulated: a plain round commits 8 tokens in 8 ms, a
    speculative iteration 1.8 tokens in 11 ms (the first of a window 15 ms, with the draft's catch-up); 80 requests
    of 128 tokens, one after another. Measuring and probing speculation must cost under 2% against plain decoding."""
    hf, target = tiny_target(vocab=8, layers=4)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    worker = Engine(EngineConfig(max_total_tokens=2048, speculative_draft_model_path=str(draft), **CHAIN), target)
    worker = worker.spec_worker
    elapsed, last_spec = 0.0, False
    for _ in range(80):
        worker._joined = True  # what after_prefill sets when a request finishes its prefill
        left = 128.0
        while left > 0:
            spec = worker.should_speculate(1)
            tokens, seconds = (1.8, 0.015 if not last_spec else 0.011) if spec else (8.0, 0.008)
            tokens = min(tokens, left)
            worker.record(spec, 1, tokens=tokens, seconds=seconds)
            elapsed, left, last_spec = elapsed + seconds, left - tokens, spec
    plain_only = 80 * 128 / 8 * 0.008
    assert elapsed < 1.02 * plain_only


def test_adaptive_mode_is_lossless(tmp_path):
    hf, target = tiny_target(vocab=8, layers=6)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    prompts = prompts_for(8, 8, seed=4)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    plain = Engine(EngineConfig(max_total_tokens=4096), target).generate(prompts, params)
    engine = Engine(EngineConfig(max_total_tokens=4096, speculative_draft_model_path=str(draft), **TREE), target)
    adaptive = engine.generate(prompts, params)
    assert [r.output_ids for r in adaptive] == [r.output_ids for r in plain]
    assert sum(r.spec.num_verify_steps for r in adaptive) > 0


@pytest.mark.parametrize("shape", ["chain", "tree"])
def test_verify_on_fixed_buffers_is_lossless_with_padded_buckets(tmp_path, shape):
    """The verify forward, the draft-tree growth and the draft extend that CUDA graphs capture, run eagerly on their
    fixed buffers (Triton kernels in the interpreter): 3 requests fill a bucket of 4, so a padded request rides
    along."""
    from serving.cuda_graph_runner import VerifyGraphRunner
    from serving.speculative.eagle_worker import _DraftExtendGraphs, _DraftTreeGraphs

    hf, target = tiny_target(vocab=8, layers=4)
    with torch.no_grad():  # peaked attention, so a wrong position or a wrong mask changes the output
        for layer in target.model.layers:
            attn = layer.self_attn
            attn.qkv_proj.weight[: attn.q_size + attn.kv_size] *= 4
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=4)
    prompts = prompts_for(8, 3, seed=7)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    plain = Engine(EngineConfig(max_total_tokens=2048), target).generate(prompts, params)
    spec_cfg = EngineConfig(
        max_total_tokens=2048, attention_backend="triton", speculative_draft_model_path=str(draft),
        disable_speculative_adaptive=True, **(CHAIN if shape == "chain" else SMALL_TREE),
    )
    eager = Engine(spec_cfg, target).generate(prompts, params)
    engine = Engine(spec_cfg, target)
    runner = engine.runner
    runner.verify_graph = VerifyGraphRunner(runner, runner.verify_num_tokens, max_bs=8, capture=False)
    worker = engine.spec_worker
    worker.draft_graphs = _DraftTreeGraphs(worker, max_bs=8, capture=False)
    worker.extend_graphs = _DraftExtendGraphs(worker, max_bs=8, capture=False)
    calls, draft_calls, extend_calls = [], [], []
    verify_run, draft_run, extend_run = runner.verify_graph.run, worker.draft_graphs.run, worker.extend_graphs.run
    runner.verify_graph.run = lambda *a: calls.append(a[0].shape[0]) or verify_run(*a)
    worker.draft_graphs.run = lambda *a: draft_calls.append(a[0].shape[0]) or draft_run(*a)
    worker.extend_graphs.run = lambda *a: extend_calls.append(len(a[0])) or extend_run(*a)
    got = engine.generate(prompts, params)
    assert [r.output_ids for r in got] == [r.output_ids for r in plain]
    assert calls and 3 in calls and draft_calls == calls and extend_calls == calls
    # The same drafts as the eager path: same acceptance, request by request.
    assert [r.spec.as_dict() for r in got] == [r.spec.as_dict() for r in eager]
    if shape == "tree":  # 2 children out of 4 draft tokens (8 target tokens): drafts get accepted
        assert sum(r.spec.num_accepted_tokens for r in got) > 0
    assert engine.allocator.num_free + engine.tree_cache.evictable_size == engine.allocator.capacity


def test_a_failed_draft_graph_capture_falls_back_to_eager_drafting(tmp_path, monkeypatch):
    """If capturing a draft CUDA graph fails (out of memory, an op that cannot be captured), the iteration still
    completes on the fixed buffers, later iterations draft eagerly, and the output stays lossless."""
    from serving import cuda_graph_runner
    from serving.speculative.eagle_worker import _DraftExtendGraphs, _DraftTreeGraphs

    target, draft, prompts, params, plain = plain_reference(tmp_path, 8, 4, 3, seed=5, max_tokens=12,
                                                            max_total_tokens=2048)  # fmt: skip
    engine = Engine(
        EngineConfig(max_total_tokens=2048, speculative_draft_model_path=str(draft), disable_speculative_adaptive=True,
                     **SMALL_TREE), target)  # fmt: skip
    worker = engine.spec_worker
    worker.draft_graphs = _DraftTreeGraphs(worker, max_bs=8, capture=False)
    worker.extend_graphs = _DraftExtendGraphs(worker, max_bs=8, capture=False)
    attempts = []

    def broken_capture(fn, pool):
        attempts.append(fn)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph_runner, "capture_graph", broken_capture)
    for graphs in (worker.draft_graphs, worker.extend_graphs):
        graphs.capture = True  # as on a GPU, with a capture that fails
    got = engine.generate(prompts, params)
    assert [r.output_ids for r in got] == [r.output_ids for r in plain]
    assert len(attempts) == 2  # one failed capture each, then no more attempts
    assert worker.draft_graphs.failed and worker.extend_graphs.failed
    assert not worker.draft_graphs.can_run(1) and not worker.extend_graphs.can_run(1)


@pytest.mark.parametrize("cfg", [CHAIN, TREE, SMALL_TREE])
def test_draft_tree_on_fixed_buffers_equals_the_eager_tree(tmp_path, cfg):
    """The draft-tree growth that CUDA graphs capture (fixed prefix width, padded batch bucket) proposes exactly the
    eager path's tree: same parents, same selected nodes, same tokens."""
    from serving.speculative.eagle_worker import _DraftTreeGraphs

    hf, target = tiny_target(vocab=64, layers=4)
    draft = make_draft(hf, tmp_path / "draft", draft_vocab=32, sharpen=4.0)
    engine = Engine(
        EngineConfig(
            max_total_tokens=2048, speculative_draft_model_path=str(draft), disable_speculative_adaptive=True, **cfg
        ),
        target,
    )
    for p in prompts_for(64, 3, seed=9):
        engine.submit(p, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    while len(engine.running) < 3 or any(not r.decode_ready for r in engine.running):
        engine.step()
    engine.step()  # one decode iteration, so the draft state comes from a draft extend after a verify
    reqs = list(engine.running)
    worker = engine.spec_worker
    seq_lens = torch.tensor([r.kv_len for r in reqs])
    eager = worker._grow_tree(reqs, seq_lens)
    worker.draft_graphs = _DraftTreeGraphs(worker, max_bs=8, capture=False)
    buffered = worker._grow_tree(reqs, seq_lens)
    for a, b in zip(eager, buffered):
        assert torch.equal(a, b)
    assert buffered[2].shape == (3, worker.num_draft_tokens - 1)


def test_capturing_the_draft_graphs_ahead_touches_no_live_request(tmp_path, monkeypatch):
    """capture_graphs captures every batch bucket and prefix width up to the asked ones, on padded buffers: live
    requests' draft KV stays as it was, and decoding continues losslessly through the captured graphs."""
    from serving import cuda_graph_runner
    from serving.speculative.eagle_worker import _DraftExtendGraphs, _DraftTreeGraphs

    class Graph:  # a CUDA graph's contract, on CPU: each replay rewrites the outputs returned at capture
        def __init__(self, fn):
            self.fn, self.out = fn, fn()

        def replay(self):
            for old, new in zip(self.out, self.fn()):
                old.copy_(new)

    def capture(fn, pool):
        graph = Graph(fn)
        return graph, graph.out

    monkeypatch.setattr(cuda_graph_runner, "capture_graph", capture)
    target, draft, prompts, params, plain = plain_reference(tmp_path, 8, 6, 3, seed=4, max_tokens=40,
                                                            max_total_tokens=4096)  # fmt: skip
    engine = Engine(
        EngineConfig(
            max_total_tokens=4096, speculative_draft_model_path=str(draft), disable_speculative_adaptive=True,
            **SMALL_TREE,
        ),
        target,
    )  # fmt: skip
    worker = engine.spec_worker
    worker.draft_graphs = _DraftTreeGraphs(worker, max_bs=8, capture=False)
    worker.extend_graphs = _DraftExtendGraphs(worker, max_bs=8, capture=False)
    reqs = [engine.submit(p, params, stream=False) for p in prompts]
    while not reqs[0].spec or reqs[0].spec.num_verify_steps < 2:
        engine.step()
    k, v = worker.draft_kv.k.clone(), worker.draft_kv.v.clone()
    for graphs in (worker.draft_graphs, worker.extend_graphs):
        graphs.capture = True
    widths = sorted({worker.draft_graphs.width(n) for n in (1, 300)})
    assert widths[0] < widths[-1]
    assert worker.capture_graphs(3, 300) == 2 * 3 * len(widths)
    expected = {(b, w) for b in (1, 2, 4) for w in widths}
    assert set(worker.draft_graphs.graphs) == set(worker.extend_graphs.graphs) == expected
    assert torch.equal(worker.draft_kv.k[:, 1:], k[:, 1:]) and torch.equal(worker.draft_kv.v[:, 1:], v[:, 1:])
    assert worker.capture_graphs(3, 300) == 0
    while not all(r.finished for r in reqs):
        engine.step()
    assert [r.output_ids for r in reqs] == [r.output_ids for r in plain]
    assert sum(r.spec.num_accepted_tokens for r in reqs) > 0


def test_speculation_resumes_after_plain_stretches_with_the_stored_aux_states(tmp_path):
    """Plain steps (several tokens each) between speculative ones: the draft catches up from the aux states the
    plain steps stored, output stays lossless, and the drafts keep getting accepted."""
    target, draft, prompts, params, plain = plain_reference(tmp_path, 8, 6, 5, seed=11, max_tokens=60,
                                                            max_total_tokens=4096)  # fmt: skip
    engine = Engine(
        EngineConfig(
            max_total_tokens=4096, speculative_draft_model_path=str(draft), num_continuous_decode_steps=3, **TREE
        ),
        target,
    )
    worker = engine.spec_worker
    turns = iter(([True] * 2 + [False] * 3) * 1000)
    worker.should_speculate = lambda batch_size: next(turns)
    caught_up = []
    catch_up = worker._catch_up
    worker._catch_up = lambda reqs: caught_up.append(len(reqs)) or catch_up(reqs)
    last_writer = {}  # KV slot -> what computed it last: "plain" (aux stored), "spec" or "prefill"
    store_aux, decode_step, after_prefill = worker.store_aux, worker.decode_step, worker.after_prefill

    def mark(slots, who):
        for slot in slots.flatten().tolist():
            last_writer[slot] = who

    worker.store_aux = lambda loc, aux: mark(loc, "plain") or store_aux(loc, aux)
    # Runs of greedy plain steps store their aux inside one call (one CUDA graph on the GPU).
    greedy_steps = engine.runner.decode_greedy_steps
    engine.runner.decode_greedy_steps = lambda rows, pos0, grid, *a, **kw: mark(grid, "plain") or greedy_steps(
        rows, pos0, grid, *a, **kw
    )
    worker.decode_step = lambda reqs, slots: mark(slots, "spec") or decode_step(reqs, slots)
    worker.after_prefill = lambda fb, batch, new_slots, *a: [mark(s, "prefill") for s in new_slots] and \
        after_prefill(fb, batch, new_slots, *a)
    released = {}  # rid -> (tokens with KV, stored aux rows, plain rows), before the request gives its KV back
    release_kv = engine._release_kv

    def snapshot(req):
        slots = req.slots.tolist()
        plain_rows = torch.tensor([last_writer[x] == "plain" for x in slots])
        released[req.rid] = (req.all_ids[: req.kv_len], worker.aux_pool[req.slots].clone(), plain_rows)
        release_kv(req)

    engine._release_kv = snapshot
    spec = engine.generate(prompts, params)
    assert [r.output_ids for r in spec] == [r.output_ids for r in plain]
    assert caught_up  # speculation resumed after plain steps
    assert sum(r.spec.num_accepted_tokens for r in spec) > sum(r.spec.num_verify_steps for r in spec) * 0.5
    assert engine.allocator.num_free + engine.tree_cache.evictable_size == engine.allocator.capacity
    # The stored aux states are the target's: compare with one prefill over each finished sequence.
    from serving.request import Req

    runner = engine.runner
    checked = 0
    for r in spec:
        ids, stored, plain_rows = released[r.rid]
        kv = len(ids)
        probe = Req(rid="p", prompt_ids=ids, params=SamplingParams(max_tokens=1))
        probe.row = runner.req_to_token.alloc()
        fresh = engine.allocator.alloc(kv)
        fb = runner.build_extend([probe], [fresh], capture_aux=True)
        _, aux = runner.forward(fb)
        torch.testing.assert_close(stored[plain_rows], aux[plain_rows], atol=1e-4, rtol=1e-4)
        checked += int(plain_rows.sum())
        engine.allocator.free(fresh)
        runner.req_to_token.free(probe.row)
    assert checked >= 5 * 20
