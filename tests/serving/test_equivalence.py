"""The engine's greedy output equals transformers' greedy output token for token (fp32, CPU)."""

import pytest
import torch

from serving.config import EngineConfig
from serving.engine import Engine
from serving.sampling import SamplingParams
from specbundle.assets import mtbench_questions
from tests.serving.conftest import chat_prompt, hf_greedy, tiny_target


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_transformers(arch):
    hf, target = tiny_target(arch)
    engine = Engine(EngineConfig(max_total_tokens=2048, chunked_prefill_size=32), target)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 20, 41, 77)]
    reqs = engine.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for prompt, req in zip(prompts, reqs):
        assert req.output_ids == hf_greedy(hf, prompt, 24, eos=False)
    # Every slot is back: free, or held by the (unlocked) prefix cache.
    assert engine.allocator.num_free + engine.tree_cache.evictable_size == engine.allocator.capacity


def test_smollm2_mtbench_matches_transformers(smollm2_target, smollm2_hf):
    tok = smollm2_target.tokenizer
    prompts = [chat_prompt(tok, q["turns"][0]) for q in mtbench_questions()[:10]]
    engine = Engine(EngineConfig(max_total_tokens=8192), smollm2_target)
    reqs = engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0))
    for prompt, req in zip(prompts, reqs):
        ref = hf_greedy(smollm2_hf, prompt, 64)
        assert req.output_ids == ref[: len(req.output_ids)]
        assert len(req.output_ids) == len(ref) or req.finish_reason == "stop"
