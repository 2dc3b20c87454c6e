"""The target's fused-kernel path (Triton norms, RoPE, SiLU-and-mul; the default on CUDA) against its torch path.
On CPU the kernels run in the Triton interpreter."""

import pytest
import torch
import torch.nn.functional as F

from kernels import rms_norm_ref, silu_and_mul_ref
from serving.config import EngineConfig
from serving.engine import Engine
from serving.request import Req
from serving.sampling import SamplingParams
from specbundle.layers import rms_norm
from tests.serving.conftest import tiny_target

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the kernels run in the Triton interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_references_round_like_the_torch_ops(dtype):
    torch.manual_seed(0)
    x = (torch.randn(64, 96) * 3).to(dtype)
    w = (torch.rand(96) + 0.5).to(dtype)
    assert torch.equal(rms_norm_ref(x, w, 1e-6), rms_norm(x, w, 1e-6))
    gate_up = (torch.randn(64, 2 * 48) * 2).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_and_mul_ref(gate_up), F.silu(gate) * up)


def _forward_hidden(engine, ids, fused, few_rows=False):
    """One prefill of `ids` (slots 1..n, row 0), returning (final hidden, aux) of the target."""
    runner = engine.runner
    model = runner.model
    model.fused_kernels = fused
    model.fused_gemv = few_rows
    try:
        req = Req(rid="x", prompt_ids=list(ids), params=SamplingParams(max_tokens=1))
        req.row = 0
        slots = torch.arange(1, len(ids) + 1)
        fb = runner.build_extend([req], [slots], capture_aux=True)
        fb.aux_layer_ids = (0, 1, 2)
        return runner.forward(fb)
    finally:
        model.fused_kernels = model.fused_gemv = False


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("few_rows", [False, True])
def test_fused_forward_matches_torch_forward(arch, dtype, few_rows):
    """Fused kernels (9 tokens), and for <= GEMV_MAX_ROWS tokens the few-row linears (norm prologue, SiLU and
    residual epilogues, residual stream updated in place), against the torch ops."""
    _, target = tiny_target(arch=arch, layers=3)
    if dtype == "bfloat16":
        target.model.to(torch.bfloat16)
        target.model.rotary.cos_sin = target.model.rotary.cos_sin.float()
    engine = Engine(EngineConfig(device=DEVICE, max_total_tokens=1024, disable_cuda_graph=True), target)
    ids = [5, 17, 99, 3, 42] if few_rows else [5, 17, 99, 3, 42, 8, 250, 1, 64]
    h_torch, aux_torch = _forward_hidden(engine, ids, fused=False)
    h_fused, aux_fused = _forward_hidden(engine, ids, fused=True, few_rows=few_rows)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == "float32" else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(h_fused.float(), h_torch.float(), **tol)
    torch.testing.assert_close(aux_fused.float(), aux_torch.float(), **tol)
    h = target.model.config.hidden_size
    assert aux_fused.shape == (len(ids), 3 * h)
    # The captured layer outputs are copies: later layers' in-place residual updates must not reach them.
    assert not torch.equal(aux_fused[:, :h], aux_fused[:, h : 2 * h])


def test_fused_greedy_generation_matches_torch_generation():
    _, target = tiny_target(arch="llama", layers=3)
    with torch.no_grad():  # clear argmax margins: greedy equality then tests the math, not rounding-level ties
        target.model.lm_head.weight.mul_(8.0)
    engine = Engine(EngineConfig(device=DEVICE, max_total_tokens=1024, disable_cuda_graph=True), target)
    model = engine.runner.model
    assert model.fused_kernels is (DEVICE == "cuda")  # the default: fused on CUDA, torch ops on CPU
    assert model.fused_gemv is (DEVICE == "cuda")  # a small model: few-row linears too
    model.fused_kernels = model.fused_gemv = False
    prompts = [[5, 17, 99, 3, 42, 8], [7, 7, 1]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = [r.output_ids for r in engine.generate(prompts, params)]
    engine.flush_cache()
    for few_rows in (False, True):  # decode steps of 2 tokens take the few-row linears when enabled
        engine.flush_cache()
        model.fused_kernels, model.fused_gemv = True, few_rows
        try:
            got = [r.output_ids for r in engine.generate(prompts, params)]
        finally:
            model.fused_kernels = model.fused_gemv = False
        assert got == want, f"few_rows={few_rows}"
