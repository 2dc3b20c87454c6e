"""Extend attention: new tokens attend to their request's paged prefix and to the request's new tokens.

Without a mask the new tokens attend causally (prefill and chunked prefill); with `custom_mask` [B, E, E] they
attend as the mask says (tree verification: every tree node sees the whole prefix and its own ancestors).
One program handles BLOCK_M new tokens x all query heads of one KV head, so the K/V of that head is read once
per token block rather than once per query head.

Split-KV (tree verify: few new tokens over a long prefix would otherwise leave most SMs idle): with S > 1 splits,
stage 1 runs B x Hkv x token blocks x S programs, each over 1/S of the prefix, writing a partial output and its
log-sum-exp; stage 2 (one program per token block) merges the S partials and then attends to the new tokens,
under the causal or custom mask. With S = 1 one kernel does both. S fixes the grid, so it is chosen on the host
from python ints (`choose_num_kv_splits`); within a request the splits divide its actual prefix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._attention_common import dot_split_p
from kernels._common import FLOAT_DTYPES, INDEX_DTYPES, check_out, check_tensor, next_pow2, num_sms, on_interpreter

_LOG2E = 1.4426950408889634

# Kernel phases (constexpr PHASE): the whole row set in one kernel, or split prefix then merge + new tokens.
FULL = tl.constexpr(0)
PREFIX_SPLIT = tl.constexpr(1)
MERGE_EXTEND = tl.constexpr(2)
BLOCK_N_GPU = 64
# Three stages: K/V gathered two blocks ahead. More shared memory per program than two stages, yet faster at
# tree-verify shapes (prefix 4096, 64 tree tokens, 128 rows, 8 warps) on an H200: 141 vs 173 us at batch 8, 537 vs
# 660 us at batch 32 (benchmarks/tune_attention.py, docs/results/h200_tune_attention.json).
NUM_STAGES_GPU = 3
# Query rows (new tokens x query heads of one KV head) per program on CUDA, for head_dim <= 128 (half above), and
# stage-1 warps (None: 8 from 128 rows, else 4).
ROWS_GPU = 128
NUM_WARPS_GPU = None
# Split heuristic: split the prefix only while the unsplit grid would leave over half of the SMs idle, up to one
# program per SM; at least MIN_KEYS_PER_SPLIT prefix keys per split, since each split of each token block writes
# and re-reads an fp32 [rows, D] partial (128 rows x 128 dims: 128 KiB, against the 512 KiB of K/V that 1024 keys
# of one KV head are). Measured on an H200 at Llama-8B tree-verify shapes (prefix 4096, 64 tree tokens): with 128
# unsplit programs (batch 8), 1 split took 136 us, 4 splits 239 us, 8 splits 271 us; at batch 32, 1 split 507 us,
# 2 splits 634 us (docs/results/h200_kernels.json).
MIN_KEYS_PER_SPLIT = 1024
MAX_KV_SPLITS = 32


def choose_num_kv_splits(
    batch: int, num_kv_heads: int, num_m_blocks: int, max_prefix_len: int, block_n: int, sm_count: int
) -> int:
    """Prefix splits for a stage-1 grid of batch x num_kv_heads x num_m_blocks x splits (host ints only).

    E.g. 132 SMs, 8 KV heads, 2 token blocks (64 tree tokens x 4 query heads per KV head), 4096-token prefix:
    batch 8 or 32 -> 1 split (128 / 512 programs); batch 1 -> 4 (64 programs, 1024 keys each); a prefix under
    2048 tokens -> 1.
    """
    num_blocks = max(1, -(-max_prefix_len // block_n))
    programs = max(1, batch * num_kv_heads * num_m_blocks)
    wanted = 1 if 2 * programs >= sm_count else -(-sm_count // programs)
    splits = max(1, min(wanted, max_prefix_len // MIN_KEYS_PER_SPLIT, MAX_KV_SPLITS))
    return -(-num_blocks // -(-num_blocks // splits))  # whole blocks per split, none empty at max_prefix_len


def block_sizes(group: int, head_dim: int, max_extend_len: int, interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_M, BLOCK_N): a program's BLOCK_M new tokens x BLOCK_G query heads and its key block."""
    block_g = next_pow2(group)
    # R = BLOCK_M * BLOCK_G query rows per program; tl.dot needs R >= 16.
    rows = 16 if interpret else (ROWS_GPU if head_dim <= 128 else ROWS_GPU // 2)
    block_m = max(1, rows // block_g)
    block_m = min(block_m, max(next_pow2(max_extend_len), max(1, 16 // block_g)))
    return block_g, block_m, 16 if interpret else BLOCK_N_GPU


@triton.jit
def _extend_attention_block(
    q,
    k_rows_ptr,
    v_rows_ptr,
    rows,
    mask_n,
    stride_kn,
    stride_vn,
    allowed,
    m_i,
    l_i,
    acc,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISE_PV: tl.constexpr,
):
    """Online-softmax update with BLOCK_N keys at token rows `rows` [BLOCK_N] (int64) of k/v (head offset applied).

    mask_n [BLOCK_N]: rows that exist; q [R, BLOCK_D]; allowed [R, BLOCK_N] bool; m_i, l_i [R]; acc [R, BLOCK_D].
    """
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_rows_ptr + rows[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    if INTERPRET:
        k = k.to(tl.float32)
    # ieee: fp32 inputs would otherwise multiply in tf32 on the GPU (10-bit mantissa); ignored for fp16/bf16.
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [R, BLOCK_N], log2 units
    qk = tl.where(allowed, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_rows_ptr + rows[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    if INTERPRET:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    elif PRECISE_PV:
        acc = dot_split_p(p, v, acc * alpha[:, None])
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _prefix_block_step(
    q, k_prefix, v_prefix, slot_row, slots, n0, kv_end, offs_n, stride_kbn, stride_vbn, m_i, l_i, acc, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, INTERPRET: tl.constexpr,
    PRECISE_PV: tl.constexpr,
):  # fmt: skip
    """One block of paged prefix keys at n0 (its slot indices `slots` loaded a block early); returns the updated
    (m_i, l_i, acc) and the next block's slot indices."""
    mask_n = n0 + offs_n < kv_end
    next_pos = n0 + BLOCK_N + offs_n
    next_slots = tl.load(slot_row + next_pos, mask=next_pos < kv_end, other=0)
    m_i, l_i, acc = _extend_attention_block(
        q, k_prefix, v_prefix, slots.to(tl.int64), mask_n, stride_kbn, stride_vbn, mask_n[None, :],
        m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_D, INTERPRET, PRECISE_PV,
    )  # fmt: skip
    return m_i, l_i, acc, next_slots


@triton.jit
def _new_block_step(
    q, k_new, v_new, start_loc, n0, offs_n, extend_len, tok, mask_r, mask_base, stride_kn, stride_vn, m_i, l_i, acc,
    qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr, USE_CUSTOM_MASK: tl.constexpr,
    PRECISE_PV: tl.constexpr,
):  # fmt: skip
    """One block of the request's new tokens at n0, causal or under the custom mask; returns (m_i, l_i, acc)."""
    pos = n0 + offs_n
    mask_n = pos < extend_len
    if USE_CUSTOM_MASK:
        seen = tl.load(mask_base + pos[None, :], mask=mask_r[:, None] & mask_n[None, :], other=0)
        allowed = (seen != 0) & mask_n[None, :]
    else:
        allowed = (pos[None, :] <= tok[:, None]) & mask_n[None, :]
    return _extend_attention_block(
        q, k_new, v_new, start_loc + pos, mask_n, stride_kn, stride_vn, allowed, m_i, l_i, acc,
        qk_scale, HEAD_DIM, BLOCK_D, INTERPRET, PRECISE_PV,
    )  # fmt: skip


@triton.jit
def _extend_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    k_buffer_ptr,
    v_buffer_ptr,
    req_to_token_ptr,
    req_pool_indices_ptr,
    prefix_lens_ptr,
    extend_lens_ptr,
    extend_start_loc_ptr,
    custom_mask_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    qk_scale,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    stride_kbn,
    stride_kbh,
    stride_vbn,
    stride_vbh,
    stride_req,
    stride_mask_b,
    stride_mask_i,
    stride_pn,
    stride_ph,
    stride_ps,
    stride_ln,
    stride_lh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_CUSTOM_MASK: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    num_m_blocks,  # runtime: a constexpr would compile a kernel per prompt length
    PHASE: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISE_PV: tl.constexpr,
):
    """PHASE FULL: prefix + new tokens -> out. PREFIX_SPLIT: prefix split `split` -> partial_out, partial_lse
    [N, Hq, S, D], [N, Hq, S] (log2 units). MERGE_EXTEND: the S partials, then the new tokens -> out."""
    # The token blocks of one split are neighbours in launch order, so the second one finds the K/V in L2.
    m_block = tl.program_id(0) % num_m_blocks
    split = tl.program_id(0) // num_m_blocks
    kv_head = tl.program_id(1)
    b = tl.program_id(2)

    extend_len = tl.load(extend_lens_ptr + b).to(tl.int32)
    if m_block * BLOCK_M < extend_len:
        start_loc = tl.load(extend_start_loc_ptr + b).to(tl.int64)

        # Row r of the tile is new token r // BLOCK_G (within this block) and query head r % BLOCK_G of the group.
        offs_r = tl.arange(0, BLOCK_M * BLOCK_G)
        tok = m_block * BLOCK_M + offs_r // BLOCK_G  # [R] index among the request's new tokens
        head = kv_head * GROUP + offs_r % BLOCK_G
        mask_r = (tok < extend_len) & (offs_r % BLOCK_G < GROUP)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < HEAD_DIM
        mask_rd = mask_r[:, None] & mask_d[None, :]
        q_rows = start_loc + tok
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :], mask=mask_rd, other=0.0
        )  # [R, BLOCK_D]
        if INTERPRET:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M * BLOCK_G], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M * BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], dtype=tl.float32)

        if PHASE != MERGE_EXTEND:
            # Prefix (all of it, or this split's whole blocks of it): every new token sees all of it.
            prefix_len = tl.load(prefix_lens_ptr + b).to(tl.int32)
            if PHASE == PREFIX_SPLIT:
                split_len = tl.cdiv(tl.cdiv(prefix_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
                kv_start = split * split_len
                kv_end = tl.minimum(kv_start + split_len, prefix_len)
            else:
                kv_start = prefix_len * 0
                kv_end = prefix_len
            req_row = tl.load(req_pool_indices_ptr + b).to(tl.int64)
            slot_row = req_to_token_ptr + req_row * stride_req
            k_prefix = k_buffer_ptr + kv_head * stride_kbh
            v_prefix = v_buffer_ptr + kv_head * stride_vbh
            # Slot indices are loaded a block early (loop-carried) so the gathers can be pipelined.
            slots = tl.load(slot_row + kv_start + offs_n, mask=kv_start + offs_n < kv_end, other=0)
            if INTERPRET:
                # The interpreter (numpy >= 2) cannot use tensors as range() bounds.
                n0 = kv_start
                while n0 < kv_end:
                    m_i, l_i, acc, slots = _prefix_block_step(
                        q, k_prefix, v_prefix, slot_row, slots, n0, kv_end, offs_n, stride_kbn, stride_vbn, m_i, l_i,
                        acc, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, INTERPRET, PRECISE_PV,
                    )  # fmt: skip
                    n0 += BLOCK_N
            else:
                for n0 in range(kv_start, kv_end, BLOCK_N):
                    m_i, l_i, acc, slots = _prefix_block_step(
                        q, k_prefix, v_prefix, slot_row, slots, n0, kv_end, offs_n, stride_kbn, stride_vbn, m_i, l_i,
                        acc, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, INTERPRET, PRECISE_PV,
                    )  # fmt: skip

        if PHASE == PREFIX_SPLIT:
            has_keys = l_i > 0.0
            lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
            part = acc / tl.where(has_keys, l_i, 1.0)[:, None]
            tl.store(
                partial_out_ptr + q_rows[:, None] * stride_pn + head[:, None] * stride_ph + split * stride_ps
                + offs_d[None, :],
                part,
                mask=mask_rd,
            )  # fmt: skip
            tl.store(partial_lse_ptr + q_rows * stride_ln + head * stride_lh + split, lse, mask=mask_r)
        else:
            if PHASE == MERGE_EXTEND:
                # Fold the splits into (m_i, l_i, acc): split s is out_s with weight 2^lse_s (empty: lse -inf).
                for s in range(NUM_SPLITS):
                    lse_s = tl.load(
                        partial_lse_ptr + q_rows * stride_ln + head * stride_lh + s, mask=mask_r, other=float("-inf")
                    )
                    part = tl.load(
                        partial_out_ptr + q_rows[:, None] * stride_pn + head[:, None] * stride_ph + s * stride_ps
                        + offs_d[None, :],
                        mask=mask_rd,
                        other=0.0,
                    )  # fmt: skip
                    m_new = tl.maximum(m_i, lse_s)
                    alpha = tl.exp2(m_i - m_new)
                    weight = tl.exp2(lse_s - m_new)
                    l_i = l_i * alpha + weight
                    acc = acc * alpha[:, None] + part * weight[:, None]
                    m_i = m_new

            # New tokens of the same request: causal, or as custom_mask says.
            if USE_CUSTOM_MASK:
                extend_end = extend_len
            else:
                extend_end = tl.minimum(extend_len, (m_block + 1) * BLOCK_M)
            k_new = k_ptr + kv_head * stride_kh
            v_new = v_ptr + kv_head * stride_vh
            mask_base = custom_mask_ptr + b * stride_mask_b + tok[:, None].to(tl.int64) * stride_mask_i
            if INTERPRET:
                n0 = extend_end * 0
                while n0 < extend_end:
                    m_i, l_i, acc = _new_block_step(
                        q, k_new, v_new, start_loc, n0, offs_n, extend_len, tok, mask_r, mask_base, stride_kn,
                        stride_vn, m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_D, INTERPRET, USE_CUSTOM_MASK,
                        PRECISE_PV,
                    )  # fmt: skip
                    n0 += BLOCK_N
            else:
                for n0 in range(0, extend_end, BLOCK_N):
                    m_i, l_i, acc = _new_block_step(
                        q, k_new, v_new, start_loc, n0, offs_n, extend_len, tok, mask_r, mask_base, stride_kn,
                        stride_vn, m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_D, INTERPRET, USE_CUSTOM_MASK,
                        PRECISE_PV,
                    )  # fmt: skip

            # A token that sees nothing (possible only under a custom mask with no prefix) gets zeros.
            out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            tl.store(
                out_ptr + q_rows[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
                out.to(out_ptr.dtype.element_ty),
                mask=mask_rd,
            )


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    max_extend_len: int,
    sm_scale: float,
    custom_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    max_prefix_len_hint: int | None = None,
    precise_pv: bool = False,
) -> torch.Tensor:
    """Attention of N new tokens (B requests, packed) over their paged prefixes and themselves.

    q [N, Hq, D]; k, v [N, Hkv, D] (the new tokens' keys/values, same rows as q); k_buffer, v_buffer
    [num_slots, Hkv, D]; req_to_token [max_reqs, max_context]; req_pool_indices, prefix_lens, extend_lens,
    extend_start_loc [B] (request b owns rows extend_start_loc[b] : extend_start_loc[b] + extend_lens[b] of q);
    max_extend_len >= max(extend_lens) (host int: it fixes the grid); custom_mask bool [B, E, E], E = max_extend_len,
    mask[b, i, j] = new token i may see new token j (None = causal). Returns out [N, Hq, D] in q's dtype; rows of
    q owned by no request are left untouched. No host sync, so it can be captured in a CUDA graph.
    num_kv_splits: how many parts the prefix is split into (None: `choose_num_kv_splits` from the batch, the KV
    heads, the token blocks, the SM count and the prefix bound max_prefix_len_hint, else req_to_token's width).
    precise_pv (bf16/fp16): probabilities enter P.V with about 16 bits (`kernels._attention_common.dot_split_p`)
    instead of rounded to bf16/fp16 as in flash attention.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    num_tokens, num_q_heads, head_dim = q.shape
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    num_kv_heads = k.shape[1]
    check_tensor("k", k, shape=(num_tokens, num_kv_heads, head_dim))
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), shape=tuple(k.shape), device=q.device, last_dim_contiguous=True)
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q has {num_q_heads} heads, not a multiple of k's {num_kv_heads} KV heads")
    for name, buf in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        check_tensor(
            name, buf, ndim=3, dtypes=(q.dtype,), shape=(None, num_kv_heads, head_dim), device=q.device,
            last_dim_contiguous=True,
        )  # fmt: skip
    check_tensor("req_to_token", req_to_token, ndim=2, dtypes=INDEX_DTYPES, device=q.device, last_dim_contiguous=True)
    batch = req_pool_indices.shape[0] if isinstance(req_pool_indices, torch.Tensor) else -1
    for name, t in (
        ("req_pool_indices", req_pool_indices),
        ("prefix_lens", prefix_lens),
        ("extend_lens", extend_lens),
        ("extend_start_loc", extend_start_loc),
    ):
        check_tensor(name, t, ndim=1, dtypes=INDEX_DTYPES, shape=(batch,), device=q.device)
        if batch > 1 and t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous")
    if not isinstance(max_extend_len, int) or max_extend_len < 0:
        raise ValueError(f"max_extend_len must be a non-negative python int, got {max_extend_len!r}")
    if custom_mask is not None:
        check_tensor(
            "custom_mask", custom_mask, ndim=3, dtypes=(torch.bool,), shape=(batch, max_extend_len, max_extend_len),
            device=q.device, last_dim_contiguous=True,
        )  # fmt: skip
    if num_kv_splits is not None and (not isinstance(num_kv_splits, int) or num_kv_splits < 1):
        raise ValueError(f"num_kv_splits must be None or a python int >= 1, got {num_kv_splits!r}")
    check_out("out", out, (num_tokens, num_q_heads, head_dim), q.dtype, q.device)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or max_extend_len == 0:
        return out

    interpret = on_interpreter(q)
    group = num_q_heads // num_kv_heads
    block_g, block_m, block_n = block_sizes(group, head_dim, max_extend_len, interpret)
    num_m_blocks = triton.cdiv(max_extend_len, block_m)
    if num_kv_splits is None:
        max_prefix_len = req_to_token.shape[1] if max_prefix_len_hint is None else max_prefix_len_hint
        num_kv_splits = choose_num_kv_splits(
            batch, num_kv_heads, num_m_blocks, max_prefix_len, block_n, num_sms(q.device)
        )
    mask_arg = custom_mask.view(torch.uint8) if custom_mask is not None else q  # q: a dummy, never read
    num_warps = NUM_WARPS_GPU or (8 if block_m * block_g >= 128 else 4)
    if num_kv_splits > 1:
        # fp32 scratch: [N, Hq, splits, D] partial outputs and [N, Hq, splits] log2-sum-exp of the prefix splits.
        partial_out = torch.empty(
            (num_tokens, num_q_heads, num_kv_splits, head_dim), dtype=torch.float32, device=q.device
        )
        partial_lse = torch.empty((num_tokens, num_q_heads, num_kv_splits), dtype=torch.float32, device=q.device)
        phases = ((PREFIX_SPLIT, num_kv_splits), (MERGE_EXTEND, 1))
    else:
        partial_out = partial_lse = q.new_empty((1, 1, 1, 1), dtype=torch.float32)  # never read
        phases = ((FULL, 1),)
    for phase, programs_per_block in phases:
        _extend_attention_kernel[(num_m_blocks * programs_per_block, num_kv_heads, batch)](
            q,
            k,
            v,
            out,
            k_buffer,
            v_buffer,
            req_to_token,
            req_pool_indices,
            prefix_lens,
            extend_lens,
            extend_start_loc,
            mask_arg,
            partial_out,
            partial_lse,
            sm_scale * _LOG2E,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            out.stride(0),
            out.stride(1),
            k_buffer.stride(0),
            k_buffer.stride(1),
            v_buffer.stride(0),
            v_buffer.stride(1),
            req_to_token.stride(0),
            custom_mask.stride(0) if custom_mask is not None else 0,
            custom_mask.stride(1) if custom_mask is not None else 0,
            partial_out.stride(0),
            partial_out.stride(1),
            partial_out.stride(2),
            partial_lse.stride(0),
            partial_lse.stride(1),
            GROUP=group,
            BLOCK_G=block_g,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            HEAD_DIM=head_dim,
            BLOCK_D=next_pow2(head_dim),
            USE_CUSTOM_MASK=custom_mask is not None,
            NUM_SPLITS=num_kv_splits,
            num_m_blocks=num_m_blocks,
            PHASE=phase.value,
            INTERPRET=interpret,
            PRECISE_PV=precise_pv and q.dtype != torch.float32,
            **({} if interpret else {"num_warps": num_warps, "num_stages": NUM_STAGES_GPU}),
        )
    return out


def extend_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: torch.Tensor,
    extend_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    max_extend_len: int,
    sm_scale: float,
    custom_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch extend attention in fp32, one request at a time; rows owned by no request are zero."""
    num_q_heads = q.shape[1]
    group = num_q_heads // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for b in range(req_pool_indices.shape[0]):
        prefix_len, extend_len, start = int(prefix_lens[b]), int(extend_lens[b]), int(extend_start_loc[b])
        if extend_len == 0:
            continue
        slots = req_to_token[int(req_pool_indices[b]), :prefix_len].long()
        keys = torch.cat([k_buffer[slots], k[start : start + extend_len]]).float().repeat_interleave(group, dim=1)
        values = torch.cat([v_buffer[slots], v[start : start + extend_len]]).float().repeat_interleave(group, dim=1)
        if custom_mask is None:
            new_mask = torch.ones(extend_len, extend_len, dtype=torch.bool, device=q.device).tril()
        else:
            new_mask = custom_mask[b, :extend_len, :extend_len]
        mask = torch.cat([torch.ones(extend_len, prefix_len, dtype=torch.bool, device=q.device), new_mask], dim=1)
        scores = torch.einsum("ihd,jhd->hij", q[start : start + extend_len].float(), keys) * sm_scale  # [Hq, E, L]
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.nan_to_num(scores.softmax(-1), nan=0.0)  # rows that see nothing -> 0
        out[start : start + extend_len] = torch.einsum("hij,jhd->ihd", probs, values)
    return out.to(q.dtype)
