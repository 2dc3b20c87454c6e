"""The compiled CUDA paths (bf16 dot operands, for-loops): run only where a GPU is present."""

import pytest
import torch

from kernels import (
    apply_rope,
    apply_rope_ref,
    build_tree,
    build_tree_ref,
    decode_attention,
    decode_attention_ref,
    extend_attention,
    extend_attention_ref,
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    silu_and_mul,
    silu_and_mul_ref,
    store_kv,
    tree_speculative_sampling,
    tree_speculative_sampling_ref,
    verify_tree_greedy,
    verify_tree_greedy_ref,
)
from tests.kernels.paged import TOLERANCES, make_paged_cache
from tests.kernels.test_extend_attention import _packed_inputs, _tree_mask
from tests.kernels.test_speculative import (
    SGL_PARENT_LIST,
    SGL_SELECTED_INDEX,
    SGL_SEQ_LENS,
    _random_sampling_case,
)

pytestmark = pytest.mark.gpu
BF16 = TOLERANCES[torch.bfloat16]


def _cuda(tree):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in tree.items()}


@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 64), (4, 128), (8, 128)])
@pytest.mark.parametrize(
    "num_kv_splits,fused_merge,precise_pv",
    [
        (None, None, False), (None, None, True), (1, None, False), (1, None, True), (5, True, False),
        (5, False, False), (5, True, True), (64, True, False),
    ],  # fmt: skip
)
def test_decode_attention_bf16(group, head_dim, num_kv_splits, fused_merge, precise_pv):
    lens = [1, 7, 37, 123, 1000]
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(lens, 2, head_dim, torch.bfloat16)
    args = [t.cuda() for t in (k_buffer, v_buffer, req_to_token, req_pool_indices, torch.tensor(lens))]
    q = torch.randn(len(lens), 2 * group, head_dim, device="cuda", dtype=torch.bfloat16)
    ref = decode_attention_ref(q, *args, head_dim**-0.5).float()
    for _ in range(2):  # the fused merge's counters are back at zero for the second launch
        out = decode_attention(
            q, *args, head_dim**-0.5, num_kv_splits=num_kv_splits, fused_merge=fused_merge, precise_pv=precise_pv
        )
        torch.testing.assert_close(out.float(), ref, **BF16)


@pytest.mark.parametrize("group,head_dim", [(1, 64), (3, 64), (4, 128)])
@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("num_kv_splits", [None, 4])
@pytest.mark.parametrize("precise_pv", [False, True])
def test_extend_attention_bf16(group, head_dim, tree, num_kv_splits, precise_pv):
    extend = [64] * 3 if tree else [7, 130, 1]
    args = _cuda(_packed_inputs([0, 300, 77], extend, 2, group, head_dim, torch.bfloat16))
    mask = _tree_mask(3, 64, torch.Generator().manual_seed(0)).cuda() if tree else None
    out = extend_attention(**args, custom_mask=mask, num_kv_splits=num_kv_splits, precise_pv=precise_pv)
    torch.testing.assert_close(out.float(), extend_attention_ref(**args, custom_mask=mask).float(), **BF16)


@pytest.mark.parametrize("precise_pv", [False, True])
def test_attention_replays_in_a_cuda_graph(precise_pv):
    """Decode and tree-verify (split prefix + merge) captured once with fixed buffers, replayed after the inputs
    change in place."""
    lens = [50, 90]
    k_buffer, v_buffer, req_to_token, req_pool_indices = [
        t.cuda() for t in make_paged_cache([200, 200], 8, 128, torch.bfloat16)
    ]
    seq_lens = torch.tensor(lens, device="cuda")
    q = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    tree_args = _cuda(_packed_inputs([60, 120], [16, 16], 8, 4, 128, torch.bfloat16, seed=3))
    tree_args.update(k_buffer=k_buffer, v_buffer=v_buffer, req_to_token=req_to_token, req_pool_indices=req_pool_indices)
    mask = _tree_mask(2, 16, torch.Generator().manual_seed(1)).cuda()
    tree_out = torch.empty_like(tree_args["q"])

    def step():
        decode_attention(
            q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.088, out=out, precise_pv=precise_pv
        )
        extend_attention(**tree_args, custom_mask=mask, out=tree_out, num_kv_splits=3, precise_pv=precise_pv)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile and warm up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_lens, new_prefix, seed in (([199, 3], [5, 150], 2), ([64, 200], [118, 0], 3)):
        q.normal_()
        seq_lens.copy_(torch.tensor(new_lens))
        tree_args["q"].normal_()
        tree_args["prefix_lens"].copy_(torch.tensor(new_prefix))
        mask.copy_(_tree_mask(2, 16, torch.Generator().manual_seed(seed)))
        graph.replay()
        torch.cuda.synchronize()
        ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.088)
        torch.testing.assert_close(out.float(), ref.float(), **BF16)
        tree_ref = extend_attention_ref(**tree_args, custom_mask=mask)
        torch.testing.assert_close(tree_out.float(), tree_ref.float(), **BF16)


def test_tree_ops_match_reference_on_gpu():
    args = (SGL_PARENT_LIST.cuda(), SGL_SELECTED_INDEX.cuda(), SGL_SEQ_LENS.cuda(), 4, 4, 8)
    for got, want in zip(build_tree(*args), build_tree_ref(*args)):
        assert torch.equal(got.cpu(), want.cpu())
    gen = torch.Generator().manual_seed(0)
    case = _random_sampling_case(64, 1000, gen, with_draft=False)
    cuda_case = [a.cuda() if isinstance(a, torch.Tensor) else a for a in case]
    for got, want in zip(tree_speculative_sampling(*cuda_case), tree_speculative_sampling_ref(*case)):
        assert torch.equal(got.cpu(), want.cpu())
    candidates, retrive_index, next_token, next_sibling = case[:4]
    target_predict = case[5].argmax(-1)
    greedy = (candidates, retrive_index, next_token, next_sibling, target_predict, case[8])
    got = verify_tree_greedy(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in greedy])
    for g, w in zip(got, verify_tree_greedy_ref(*greedy)):
        assert torch.equal(g.cpu(), w.cpu())


def test_elementwise_kernels_bf16():
    x = torch.randn(37, 576, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x)
    weight = torch.rand(576, device="cuda", dtype=torch.bfloat16)
    want_x, want_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(residual, want_residual, atol=0, rtol=0)  # GPU casts round to nearest
    torch.testing.assert_close(x, want_x, atol=2e-2, rtol=1.6e-2)  # two roundings, as the unfused ops

    q = torch.randn(7, 9, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(7, 3, 64, device="cuda", dtype=torch.bfloat16)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 64, 2, device="cuda") / 64)
    freqs = torch.outer(torch.arange(100, device="cuda", dtype=torch.float32), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1)
    positions = torch.randint(0, 100, (7,), device="cuda")
    want_q, want_k = apply_rope_ref(q, k, positions, cos_sin)
    apply_rope(q, k, positions, cos_sin)
    torch.testing.assert_close(q, want_q, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(k, want_k, atol=1e-2, rtol=1e-2)

    gate_up = torch.randn(5, 2 * 1536, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), atol=2e-2, rtol=1.6e-2)

    k_buffer = torch.zeros(20, 3, 64, device="cuda", dtype=torch.bfloat16)
    v_buffer = torch.zeros_like(k_buffer)
    loc = torch.tensor([4, 19, 0], device="cuda")
    new_k, new_v = torch.randn(3, 3, 64, device="cuda").bfloat16(), torch.randn(3, 3, 64, device="cuda").bfloat16()
    store_kv(k_buffer, v_buffer, loc, new_k, new_v)
    assert torch.equal(k_buffer[loc], new_k) and torch.equal(v_buffer[loc], new_v)
