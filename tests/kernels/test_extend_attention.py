import pytest
import torch

from kernels.extend_attention import choose_num_kv_splits, extend_attention, extend_attention_ref
from tests.kernels.paged import DEVICE, TOLERANCES, make_paged_cache, to_device


def _packed_inputs(prefix, extend, num_kv_heads, group, head_dim, dtype, seed=0):
    """extend_attention's keyword arguments for B = len(prefix) packed requests, every tensor on DEVICE."""
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(prefix, num_kv_heads, head_dim, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    num_tokens = sum(extend)
    extend_lens = torch.tensor(extend, dtype=torch.int32)
    new_tokens = to_device(
        dict(
            q=torch.randn(num_tokens, num_kv_heads * group, head_dim, generator=gen).to(dtype),
            k=torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype),
            v=torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen).to(dtype),
            prefix_lens=torch.tensor(prefix, dtype=torch.int64),
            extend_lens=extend_lens,
            extend_start_loc=(torch.cumsum(extend_lens, 0) - extend_lens).to(torch.int32),
        )
    )
    return dict(
        **new_tokens,
        k_buffer=k_buffer,
        v_buffer=v_buffer,
        req_to_token=req_to_token,
        req_pool_indices=req_pool_indices,
        max_extend_len=max(extend),
        sm_scale=head_dim**-0.5,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_extend_attention_causal_matches_reference(dtype, group, head_dim):
    """Prefill (no prefix), chunked prefill (prefix + chunk) and a single new token, in one packed batch."""
    args = _packed_inputs([0, 37, 5, 123], [7, 23, 1, 9], 2, group, head_dim, dtype)
    out = extend_attention(**args)
    ref = extend_attention_ref(**args)
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOLERANCES[dtype])


def _tree_mask(batch, num_nodes, gen):
    """Random trees: node i's parent is a random earlier node; node i sees itself and its ancestors (on DEVICE)."""
    mask = torch.zeros(batch, num_nodes, num_nodes, dtype=torch.bool)
    for b in range(batch):
        for i in range(num_nodes):
            mask[b, i, i] = True
            if i > 0:
                parent = int(torch.randint(0, i, (1,), generator=gen))
                mask[b, i] |= mask[b, parent]
    return mask.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_extend_attention_tree_mask_matches_reference(dtype, group, head_dim):
    num_nodes = 11
    prefix = [1, 37, 18]
    args = _packed_inputs(prefix, [num_nodes] * 3, 1, group, head_dim, dtype, seed=5)
    mask = _tree_mask(3, num_nodes, torch.Generator().manual_seed(2))
    out = extend_attention(**args, custom_mask=mask)
    ref = extend_attention_ref(**args, custom_mask=mask)
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOLERANCES[dtype])
    causal = extend_attention_ref(**args)
    assert (ref.float() - causal.float()).abs().max() > 0.05  # the tree mask is not the causal mask


@pytest.mark.parametrize("num_kv_splits", [1, 3])
def test_extend_attention_padded_mask_and_short_requests(num_kv_splits):
    """extend_lens below max_extend_len (the mask is padded to E x E) and an out= buffer."""
    args = _packed_inputs([4, 0, 30], [3, 9, 1], 2, 4, 64, torch.float32, seed=9)
    mask = torch.rand(3, 9, 9, generator=torch.Generator().manual_seed(0)) < 0.5
    mask = (mask | torch.eye(9, dtype=torch.bool)).to(DEVICE)
    out = torch.full_like(args["q"], float("nan"))
    res = extend_attention(**args, custom_mask=mask, out=out, num_kv_splits=num_kv_splits)
    assert res is out
    ref = extend_attention_ref(**args, custom_mask=mask)
    torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float32])


def test_extend_attention_rejects_bad_arguments():
    args = _packed_inputs([4, 4], [3, 3], 2, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="custom_mask"):
        extend_attention(**args, custom_mask=torch.ones(2, 4, 4, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="custom_mask"):
        extend_attention(**args, custom_mask=torch.ones(2, 3, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="extend_lens"):
        extend_attention(**{**args, "extend_lens": args["extend_lens"][:1]})
    with pytest.raises(ValueError, match="max_extend_len"):
        extend_attention(**{**args, "max_extend_len": 3.0})
    with pytest.raises(ValueError, match="^k has"):
        extend_attention(**{**args, "k": args["k"][:5]})
    with pytest.raises(ValueError, match="num_kv_splits"):
        extend_attention(**args, num_kv_splits=0)


@pytest.mark.parametrize("num_kv_heads,group,head_dim", [(3, 3, 64), (2, 7, 80)])
@pytest.mark.parametrize("tree", [False, True])
def test_extend_attention_odd_groups_and_head_dims(num_kv_heads, group, head_dim, tree):
    """SmolLM2's 9 query / 3 KV heads (group 3), and a group of 7 with a non-power-of-two head dim."""
    extend = [6, 6] if tree else [7, 3]
    args = _packed_inputs([11, 0], extend, num_kv_heads, group, head_dim, torch.float16, seed=4)
    mask = _tree_mask(2, 6, torch.Generator().manual_seed(1)) if tree else None
    out = extend_attention(**args, custom_mask=mask)
    ref = extend_attention_ref(**args, custom_mask=mask)
    torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tree", [False, True])
@pytest.mark.parametrize("num_kv_splits", [2, 3, 7])
def test_extend_attention_prefix_splits_match_reference(dtype, tree, num_kv_splits):
    """Split-KV prefix + merge kernel (which also attends to the new tokens). Prefixes of 0..3 interpreter blocks
    (16 keys): 7 splits leave most splits empty, and the request without a prefix has only empty splits."""
    prefix, extend = [1, 37, 18, 0, 48], [5, 5, 5, 5, 5] if tree else [7, 2, 5, 4, 1]
    args = _packed_inputs(prefix, extend, 2, 4, 64, dtype, seed=11)
    mask = _tree_mask(5, 5, torch.Generator().manual_seed(3)) if tree else None
    ref = extend_attention_ref(**args, custom_mask=mask)
    out = extend_attention(**args, custom_mask=mask, num_kv_splits=num_kv_splits)
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), **TOLERANCES[dtype])
    one_split = extend_attention(**args, custom_mask=mask, num_kv_splits=1)
    torch.testing.assert_close(out.float().cpu(), one_split.float().cpu(), **TOLERANCES[dtype])


def test_extend_attention_splits_a_long_prefix_by_default():
    """No num_kv_splits: the heuristic splits a 2048-token prefix for a lone request; the result is the reference."""
    args = _packed_inputs([2048], [4], 1, 2, 64, torch.float32, seed=12)
    mask = _tree_mask(1, 4, torch.Generator().manual_seed(4))
    assert choose_num_kv_splits(1, 1, 1, 2048 + 3, 16, 4) == 2  # CPU: block 16, a nominal 4 SMs
    out = extend_attention(**args, custom_mask=mask)
    ref = extend_attention_ref(**args, custom_mask=mask)
    torch.testing.assert_close(out.cpu(), ref.cpu(), **TOLERANCES[torch.float32])


def test_choose_num_kv_splits_at_llama_tree_verify_shapes():
    """H200 (132 SMs), 8 KV heads, 64 tree tokens x 4 query heads = 2 token blocks of 128 rows, blocks of 64 keys."""
    assert choose_num_kv_splits(8, 8, 2, 4096, 64, 132) == 1  # 128 programs: splitting measured slower
    assert choose_num_kv_splits(32, 8, 2, 4096, 64, 132) == 1
    assert choose_num_kv_splits(1, 8, 2, 4096, 64, 132) == 4  # 16 programs; 1024 keys per split at least
    assert choose_num_kv_splits(1, 8, 2, 32768, 64, 132) == 9  # up to one program per SM (144 >= 132)
    assert choose_num_kv_splits(1, 3, 1, 8192, 64, 132) == 8  # SmolLM2 verify at batch 1: 3 programs
    assert choose_num_kv_splits(8, 8, 2, 1500, 64, 132) == 1  # under 2 x 1024 keys: not worth a partial
    assert choose_num_kv_splits(128, 8, 2, 4096, 64, 132) == 1  # the grid is full without splitting
    for batch, prefix in ((1, 3000), (2, 5000), (8, 4097)):
        splits = choose_num_kv_splits(batch, 8, 2, prefix, 64, 132)
        blocks = -(-prefix // 64)
        per_split = -(-blocks // splits)
        assert (splits - 1) * per_split < blocks  # no split is empty at the bound
        assert per_split * 64 >= 1024  # each split keeps at least MIN_KEYS_PER_SPLIT keys
