import pytest
import torch

from kernels.decode_attention import choose_num_kv_splits, decode_attention, decode_attention_ref
from tests.kernels.paged import DEVICE, TOLERANCES, make_paged_cache, randn

SEQ_LENS = [1, 7, 37, 123]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_attention_matches_reference(dtype, group, head_dim):
    num_kv_heads = 2
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(SEQ_LENS, num_kv_heads, head_dim, dtype)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=DEVICE)
    q = randn(len(SEQ_LENS), num_kv_heads * group, head_dim, seed=1, dtype=dtype)
    scale = head_dim**-0.5
    out = decode_attention(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, scale, num_kv_splits=3)
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, scale)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOLERANCES[dtype])


@pytest.mark.parametrize("num_kv_splits", [1, 16])
def test_decode_attention_split_counts_and_out_buffer(num_kv_splits):
    """One split (whole length in one program) and more splits than blocks (empty splits) agree with the reference."""
    lens = [5, 123, 40]
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(lens, 1, 64, torch.float32, seed=3)
    seq_lens = torch.tensor(lens, dtype=torch.int64, device=DEVICE)
    q = randn(3, 4, 64, seed=4)
    out = torch.full_like(q, float("nan"))
    res = decode_attention(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125, out=out, num_kv_splits=num_kv_splits
    )
    assert res is out
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125)
    torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float32])
    # A hint below the real lengths only lowers the split count; splits then cover more blocks each.
    hinted = decode_attention(
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125, num_kv_splits=num_kv_splits,
        max_seq_len_hint=20,
    )  # fmt: skip
    torch.testing.assert_close(hinted.cpu(), ref.cpu(), **TOLERANCES[torch.float32])


def test_decode_attention_default_splits_long_context():
    """num_kv_splits None: the heuristic picks several splits from max_seq_len_hint (and, without one, from
    req_to_token's width); both match the reference."""
    lens = [300, 17]
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(lens, 2, 64, torch.float32, seed=7)
    seq_lens = torch.tensor(lens, device=DEVICE)
    q = randn(2, 8, 64, seed=8)
    assert choose_num_kv_splits(2, 2, 300, 16, 4) == 10  # CPU: block 16, a nominal 4 SMs
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125)
    for hint in (300, None):
        out = decode_attention(
            q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.125, max_seq_len_hint=hint
        )
        torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float32])


def test_choose_num_kv_splits_at_llama_decode_shapes():
    """H200 (132 SMs), 8 KV heads, 4096 keys in blocks of 64: ~4096 stage-1 programs, at least 2 blocks per split."""
    assert choose_num_kv_splits(8, 8, 4096, 64, 132) == 32
    assert choose_num_kv_splits(32, 8, 4096, 64, 132) == 16
    assert choose_num_kv_splits(1, 8, 131072, 64, 132) == 64  # capped at MAX_KV_SPLITS
    assert choose_num_kv_splits(256, 8, 4096, 64, 132) == 3  # 6144 programs already: 22 blocks per split
    assert choose_num_kv_splits(8, 8, 100, 64, 132) == 1  # two blocks: one split
    for batch, length in ((3, 1000), (8, 4097), (64, 777)):
        splits = choose_num_kv_splits(batch, 8, length, 64, 132)
        blocks = -(-length // 64)
        assert (splits - 1) * -(-blocks // splits) < blocks  # no split is empty at the bound


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


@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(3, 3, 64), (2, 7, 80)])
def test_decode_attention_odd_groups_and_head_dims(num_kv_heads, group, head_dim):
    """SmolLM2's 9 query / 3 KV heads (group 3), and a group of 7 with a non-power-of-two head dim."""
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(SEQ_LENS, num_kv_heads, head_dim, torch.half)
    seq_lens = torch.tensor(SEQ_LENS, device=DEVICE)
    q = randn(len(SEQ_LENS), num_kv_heads * group, head_dim, seed=6, dtype=torch.half)
    out = decode_attention(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.1, num_kv_splits=2)
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, 0.1)
    torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float16])
