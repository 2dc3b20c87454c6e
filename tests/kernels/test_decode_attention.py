import importlib

import pytest
import torch

from kernels.decode_attention import choose_num_kv_splits, decode_attention, decode_attention_ref
from tests.kernels.paged import DEVICE, TOLERANCES, make_paged_cache, randn

decode_module = importlib.import_module("kernels.decode_attention")  # `kernels` re-exports the function by that name

SEQ_LENS = [1, 7, 37, 123]


@pytest.mark.parametrize("fused_merge", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_matches_reference(dtype, group, head_dim, fused_merge):
    num_kv_heads = 2
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(SEQ_LENS, num_kv_heads, head_dim, dtype)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=DEVICE)
    q = randn(len(SEQ_LENS), num_kv_heads * group, head_dim, seed=1, dtype=dtype)
    scale = head_dim**-0.5
    out = decode_attention(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, scale, num_kv_splits=3, fused_merge=fused_merge
    )  # fmt: skip
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOLERANCES[dtype])


@pytest.mark.parametrize("fused_merge", [True, False])
@pytest.mark.parametrize("num_kv_splits", [1, 16])
def test_decode_attention_split_counts_and_out_buffer(num_kv_splits, fused_merge):
    """One split (whole length in one program, no merge) and more splits than blocks (empty splits) agree with the
    reference, whichever way the splits are merged."""
    lens = [5, 123, 40]
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(lens, 1, 64, torch.float32, seed=3)
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    q = randn(3, 4, 64, seed=4)
    out = torch.full_like(q, float("nan"))
    res = decode_attention(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125, out=out, num_kv_splits=num_kv_splits,
        fused_merge=fused_merge,
    )  # fmt: skip
    assert res is out
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125)
    torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float32])
    # A hint below the real lengths only lowers the split count; splits then cover more blocks each.
    hinted = decode_attention(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125, num_kv_splits=num_kv_splits,
        max_seq_len_hint=20, fused_merge=fused_merge,
    )  # fmt: skip
    torch.testing.assert_close(hinted.cpu(), ref.cpu(), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_precise_pv_keeps_the_probabilities_bits(group, num_kv_splits):
    """Values of +-100 whose probability-weighted mean is nearly 0: rounding the probabilities to bf16 (flash
    attention's P.V, the default) errs by 0.03-0.04 here, the precise P.V by about 1e-4 (the output's own bf16
    rounding). Every query head of the group is the same vector, so that one centring of the values serves them all.
    (The interpreter multiplies fp32 probabilities by upcast values: the GPU run is the one that checks the split.)"""
    n, head_dim, scale = 150, 64, 0.125
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache([n], 1, head_dim, torch.bfloat16, seed=31)
    q = randn(1, 1, head_dim, seed=32, dtype=torch.bfloat16).expand(1, group, head_dim).contiguous()
    slots = req_to_token[req_pool_indices[0], :n].long()
    keys = k_buffer[slots, 0].double()
    probs = torch.softmax((keys @ q[0, 0].double()) * scale, 0)
    x = torch.randn(n, head_dim, generator=torch.Generator().manual_seed(33), dtype=torch.float64).to(DEVICE)
    v_buffer[slots, 0] = (100 * (x - probs @ x)).to(torch.bfloat16)
    exact = (probs @ v_buffer[slots, 0].double()).float()
    seq_lens = torch.tensor([n], dtype=torch.int32, device=DEVICE)
    args = (q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, scale)
    out = decode_attention(*args, num_kv_splits=num_kv_splits, precise_pv=True)
    assert exact.abs().max() < 0.2  # the centring worked: the rounding of p would dominate the result
    assert (out[0].float() - exact).abs().max() < 2e-3
    if DEVICE.type == "cuda":  # the default rounds p to bf16 (the interpreter's dot does not)
        rounded = decode_attention(*args, num_kv_splits=num_kv_splits)
        assert (rounded[0].float() - exact).abs().max() > 1e-2


def test_fused_merge_leaves_its_counters_at_zero():
    """The last split program of each (request, KV head) merges and resets its counter, so back-to-back launches
    (as graph replays are) keep matching the reference."""
    lens = [70, 9, 33]
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(lens, 2, 64, torch.float32, seed=11)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = randn(3, 4, 64, seed=12)
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125)
    args = (q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125)
    for _ in range(2):
        out = decode_attention(*args, num_kv_splits=4, fused_merge=True)
        torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float32])
    counters = decode_module._COUNTERS[q.device]
    assert counters.numel() >= 3 * 2 and int(counters.abs().sum()) == 0
    # A batch needing more counters gets a new buffer; the old one stays alive for graphs captured with it.
    grown = decode_module._merge_counters(q.device, counters.numel() + 1)
    assert grown is decode_module._COUNTERS[q.device] and grown.numel() > counters.numel()
    assert any(t is counters for t in decode_module._RETIRED_COUNTERS)


@pytest.mark.parametrize("merge_values", [256, 16384])
def test_fused_merge_in_head_chunks(monkeypatch, merge_values):
    """A group whose partials would not fit in registers at once is merged a few heads at a time."""
    if merge_values == decode_module.MERGE_VALUES:
        # 16384 values: a group of 4 at 32 splits of head dim 128 at once; 8 at 64 splits in four steps.
        assert decode_module.merge_heads(4, 32, 128) == 4 and decode_module.merge_heads(8, 64, 128) == 2
        assert decode_module.merge_heads(3, 64, 64) == 4  # a power of two, masked to the group
    monkeypatch.setattr(decode_module, "MERGE_VALUES", merge_values)
    assert decode_module.merge_heads(8, 4, 64) == (1 if merge_values == 256 else 8)
    lens = [123, 40]
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(lens, 1, 64, torch.float32, seed=21)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = randn(2, 8, 64, seed=22)
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125)
    out = decode_attention(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125, num_kv_splits=3, fused_merge=True
    )
    torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float32])


def test_decode_attention_default_splits_long_context():
    """num_kv_splits None: the heuristic picks several splits from max_seq_len_hint (and, without one, from
    req_to_token's width); both match the reference."""
    lens = [300, 17]
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(lens, 1, 64, torch.float32, seed=7)
    seq_lens = torch.tensor(lens, device=DEVICE)
    q = randn(2, 4, 64, seed=8)
    assert choose_num_kv_splits(2, 1, 300, 16, 4) == 4  # CPU: block 16, a nominal 4 SMs
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125)
    for hint in (300, None):
        out = decode_attention(
            q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125, max_seq_len_hint=hint
        )
        torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float32])


def test_decode_launch_at_llama_decode_shapes():
    """H200 (132 SMs), 8 KV heads, 4096 keys in blocks of 128 (bf16, head dim 128): the split counts that measured
    fastest there, for three resident programs per SM (bf16 P.V) and two (precise P.V); 2 stages, 3 when a short
    context leaves at most one program per SM."""
    assert decode_module.decode_block_n(128, 2) == 128
    assert decode_module.decode_block_n(128, 4) == 64  # fp32: the pipeline's buffers must fit in shared memory
    assert decode_module.decode_block_n(64, 2) == 128
    assert decode_module.decode_block_n(256, 2) == 64
    assert decode_module.decode_block_n(128, 2, interpret=True) == 16
    cases = {  # batch: (splits at 3 programs per SM, splits at 2, stages)
        1: (32, 32, 2),  # 256 programs of one block each
        8: (4, 4, 2),  # 256 programs: as full as 6 splits' 384, fewer partials
        12: (4, 8, 2),  # 384 programs; at two per SM, 768 in three nearly full waves
        16: (2, 2, 2),
        24: (2, 4, 2),
        32: (1, 1, 2),
        48: (1, 2, 2),
        64: (3, 1, 2),  # 1536 programs in four nearly full waves; at two per SM, 512 in two
        128: (1, 1, 2),  # the grid is full without splitting
    }
    for batch, (splits, splits_precise, stages) in cases.items():
        assert choose_num_kv_splits(batch, 8, 4096, 128, 132) == splits, batch
        assert choose_num_kv_splits(batch, 8, 4096, 128, 132, programs_per_sm=2) == splits_precise, batch
        assert decode_module.decode_num_stages(batch * 8 * splits, 132) == stages, batch
    assert choose_num_kv_splits(1, 8, 1 << 20, 128, 132) == 33  # 264 programs: two on every SM
    assert choose_num_kv_splits(1, 1, 1 << 20, 128, 132) == 64  # capped at MAX_KV_SPLITS
    assert choose_num_kv_splits(8, 8, 300, 128, 132) == 3  # three blocks: 192 programs, one block each
    assert decode_module.decode_num_stages(8 * 8 * 1, 132) == 3
    for batch, length in ((3, 1000), (8, 4097), (64, 777), (1, 700), (2, 1300), (5, 4000), (40, 9000)):
        for per_sm in (2, 3):
            splits = choose_num_kv_splits(batch, 8, length, 128, 132, programs_per_sm=per_sm)
            blocks = -(-length // 128)
            assert 1 <= splits <= blocks and (splits - 1) * -(-blocks // splits) < blocks  # no split is empty


def test_decode_attention_ignores_slots_past_seq_len():
    lens = [9]
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(lens, 2, 64, torch.float32)
    seq_lens = torch.tensor(lens, device=DEVICE)
    q = randn(1, 4, 64, seed=5)
    before = decode_attention(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125)
    req_to_token[req_pool_indices[0], 9:] = req_to_token[req_pool_indices[0], 0]  # poison unused positions
    after = decode_attention(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125)
    torch.testing.assert_close(before.cpu(), after.cpu(), atol=0, rtol=0)


def test_decode_attention_rejects_bad_arguments():
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache([4, 4], 2, 64, torch.float32)
    q = randn(2, 4, 64)
    seq_lens = torch.tensor([4, 4], device=DEVICE)
    with pytest.raises(ValueError, match="q has 3 heads"):
        decode_attention(q[:, :3], k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 1.0)
    with pytest.raises(ValueError, match="k_buffer"):
        decode_attention(q, k_buffer.half(), v_buffer, req_to_token, req_pool_indices, seq_lens, 1.0)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens[:1], 1.0)
    with pytest.raises(ValueError, match="out"):
        decode_attention(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 1.0, out=q[:1].clone())
    with pytest.raises(ValueError, match="num_kv_splits"):
        decode_attention(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 1.0, num_kv_splits=0)
    with pytest.raises(ValueError, match="fused_merge"):
        decode_attention(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 1.0, fused_merge="yes")


@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(3, 3, 64), (2, 7, 80)])
def test_decode_attention_odd_groups_and_head_dims(num_kv_heads, group, head_dim):
    """SmolLM2's 9 query / 3 KV heads (group 3), and a group of 7 with a non-power-of-two head dim."""
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(SEQ_LENS, num_kv_heads, head_dim, torch.half)
    seq_lens = torch.tensor(SEQ_LENS, device=DEVICE)
    q = randn(len(SEQ_LENS), num_kv_heads * group, head_dim, seed=6, dtype=torch.half)
    out = decode_attention(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.1, num_kv_splits=2)
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.1)
    torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float16])
