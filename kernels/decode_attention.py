"""Paged decode attention over SGLang's KV-cache layout, split along the KV length (flash-decoding).

Stage 1: one program per (request, KV head, KV split) processes the whole group of query heads that share the KV
head, so each K/V block is read once per KV head, and writes a partial output and its log-sum-exp.

With several splits, the last split program of each (request, KV head) to finish merges them (`fused_merge`), or a
second launch does: one program per (request, query head).

The split count fixes the grid, so it is chosen on the host from python ints only (batch, heads, a length bound
and the SM count): `choose_num_kv_splits`, and the pipeline depth with it (`decode_num_stages`). Within a request
the splits divide its actual length, so a short request just has short splits.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels._attention_common import dot_split_p
from kernels._common import FLOAT_DTYPES, INDEX_DTYPES, check_out, check_tensor, next_pow2, num_sms, on_interpreter

_LOG2E = 1.4426950408889634


# Decode launch configuration on CUDA: keys per block (for 2-byte K/V of head dim <= 128; fewer for wider rows, so
# that the pipeline's buffers fit in shared memory) and stage-1 warps.
BLOCK_N_GPU = 128
NUM_WARPS_GPU = 4
# Stage-1 pipeline depth: None chooses it with the split count (`decode_num_stages`); an int forces it.
NUM_STAGES_GPU = None
MAX_KV_SPLITS = 64
# Stage-1 programs that one SM holds at once (H200; 2-byte K/V, head dim 128, blocks of 128 keys, 2 stages): three
# with P.V in half precision (137 registers, 72 KiB of shared memory each), two with the precise P.V (209 registers,
# 76 KiB).
PROGRAMS_PER_SM = 3
PROGRAMS_PER_SM_PRECISE = 2
# Score lost per wave beyond the first in `choose_num_kv_splits` (more program start-ups and partials to merge).
WAVE_COST = 0.04
# Partial-output values the in-launch merge holds at once.
MERGE_VALUES = 16384
# Split merge on CUDA: by the last split program of each (request, KV head) (True) or by a second launch (False).
FUSED_MERGE_GPU = True

# How stage 1 ends (its MERGE constexpr).
MERGE_NONE = tl.constexpr(0)  # one split: stage 1 writes the output
MERGE_KERNEL = tl.constexpr(1)  # partials, merged by the stage-2 launch
MERGE_LAST_SPLIT = tl.constexpr(2)  # partials, merged by the last program of the group to finish

# Per-(request, KV head) arrival counters for MERGE_LAST_SPLIT, zero between launches: one buffer per device, made
# on first use (before any CUDA-graph capture: captures warm up eagerly first).
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED_COUNTERS: list[torch.Tensor] = []
_MIN_COUNTERS = 8192


def decode_block_n(head_dim: int, element_size: int, interpret: bool = False) -> int:
    """Keys per stage-1 block: BLOCK_N_GPU for rows of up to 256 bytes (bf16 x 128), halved per doubling beyond."""
    if interpret:
        return 16
    row_bytes = next_pow2(head_dim) * element_size
    return max(16, min(BLOCK_N_GPU, BLOCK_N_GPU * 256 // row_bytes))


def precise_pv_applies(dtype: torch.dtype, precise_pv: bool) -> bool:
    """The split P.V exists for half-precision K/V only: fp32 probabilities already enter an fp32 product whole."""
    return precise_pv and dtype != torch.float32


def programs_per_sm(dtype: torch.dtype, precise_pv: bool) -> int:
    """Stage-1 programs one SM holds at once, for the split count (`choose_num_kv_splits`)."""
    return PROGRAMS_PER_SM_PRECISE if precise_pv_applies(dtype, precise_pv) else PROGRAMS_PER_SM


@functools.lru_cache(maxsize=4096)
def choose_num_kv_splits(
    batch: int, num_kv_heads: int, max_seq_len: int, block_n: int, sm_count: int, programs_per_sm: int = PROGRAMS_PER_SM
) -> int:
    """KV splits for a stage-1 grid of batch x num_kv_heads x splits (host ints only: safe under graph capture).

    Decode is a stream of K/V reads, as fast as the programs keep every SM loading to the end. A split count giving
    P programs is scored by how full it leaves the SMs: within one wave (P <= programs_per_sm x SMs, the SMs
    holding ceil(P / SMs) programs or one fewer) P / (SMs x ceil(P / SMs)), halved when SMs hold one program each
    (one program loads one block ahead: about half an SM's bandwidth); over several waves, the last wave's share
    of a full one less WAVE_COST per extra wave. The best score wins, ties going to the fewest programs. Never more
    splits than blocks at max_seq_len, and no split left empty. On an H200 (132 SMs, 8 KV heads, 4096 keys in
    blocks of 128, three programs per SM) this picked the fastest count of 1-8 measured at batch 8-64 (bf16 P.V):
    batch 8 -> 4 splits (256 programs), 12 -> 4 (384), 16 -> 2, 24 -> 2, 32 -> 1, 48 -> 1, 64 -> 3 (four waves).
    Cached: eager decode asks once per layer and step with the same few inputs.
    """
    pairs = max(1, batch * num_kv_heads)
    num_blocks = max(1, -(-max_seq_len // block_n))
    slots = max(1, programs_per_sm * sm_count)
    best, best_score = 1, -1.0
    for splits in range(1, min(num_blocks, MAX_KV_SPLITS) + 1):
        if -(-num_blocks // -(-num_blocks // splits)) != splits:
            continue  # blocks of ceil(num_blocks / splits) would leave this many splits with nothing to do
        programs = pairs * splits
        if programs <= slots:
            per_sm = -(-programs // sm_count)
            score = programs / (sm_count * per_sm) / (2 if per_sm == 1 else 1)
        else:
            waves = -(-programs // slots)
            score = programs / (slots * waves) - WAVE_COST * (waves - 1)
        if score > best_score + 1e-9:
            best, best_score = splits, score
    return best


def merge_heads(group: int, block_s: int, block_d: int) -> int:
    """Query heads merged at a time by the last split program: all of the group while their partials take at most
    MERGE_VALUES fp32 registers' worth (128 per thread at 4 warps), fewer (a power of two) beyond."""
    fit = max(1, MERGE_VALUES // (block_s * block_d))
    return min(next_pow2(group), 1 << (fit.bit_length() - 1))


def decode_num_stages(programs: int, sm_count: int) -> int:
    """Stage-1 pipeline depth for a grid of `programs`: K/V one block ahead when SMs run several programs (two or
    three such programs fit in shared memory), two blocks ahead when at most one program per SM is left."""
    return 3 if programs <= sm_count else 2


@triton.jit
def _decode_attention_block(
    q,
    k_buffer_ptr,
    v_buffer_ptr,
    slots,
    mask_n,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    kv_head,
    m_i,
    l_i,
    acc,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISE_PV: tl.constexpr,
):
    """Online-softmax update of (m_i, l_i, acc) [BLOCK_H], [BLOCK_H], [BLOCK_H, BLOCK_D] with the keys at KV-cache
    slots `slots` [BLOCK_N] (int64), of which those under mask_n exist."""
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = mask_n[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(
        k_buffer_ptr + slots[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    if INTERPRET:
        k = k.to(tl.float32)
    # ieee: fp32 inputs would otherwise multiply in tf32 on the GPU (10-bit mantissa); ignored for fp16/bf16.
    qk = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [BLOCK_H, BLOCK_N], log2 units
    qk = tl.where(mask_n[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_buffer_ptr + slots[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    if INTERPRET:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    elif PRECISE_PV:
        acc = dot_split_p(p, v, acc * alpha[:, None])
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _attend_range(
    q_row,
    heads,
    mask_h,
    k_buffer_ptr,
    v_buffer_ptr,
    slot_row,
    start,
    end,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    kv_head,
    qk_scale,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISE_PV: tl.constexpr,
):
    """(out [BLOCK_H, BLOCK_D] fp32, log2-sum-exp [BLOCK_H]) of the query heads `heads` (rows of q_row, those under
    mask_h) over the keys at positions [start, end) of one request, whose KV-cache slots are at slot_row[position],
    in blocks of BLOCK_N. No keys: out 0, lse -inf."""
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_row + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_h[:, None] & mask_d[None, :], other=0.0
    )  # [BLOCK_H, BLOCK_D]
    if INTERPRET:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    # The slot indices of the next block are loaded one iteration early (loop-carried), so that the K/V gathers
    # depend on no load of their own iteration and the pipeliner can issue them num_stages - 1 blocks ahead.
    offs_n = tl.arange(0, BLOCK_N)
    slots = tl.load(slot_row + start + offs_n, mask=start + offs_n < end, other=0)
    if INTERPRET:
        # The interpreter (numpy >= 2) cannot use tensors as range() bounds.
        n0 = start
        while n0 < end:
            next_pos = n0 + BLOCK_N + offs_n
            next_slots = tl.load(slot_row + next_pos, mask=next_pos < end, other=0)
            m_i, l_i, acc = _decode_attention_block(
                q, k_buffer_ptr, v_buffer_ptr, slots.to(tl.int64), n0 + offs_n < end, stride_kn, stride_kh,
                stride_vn, stride_vh, kv_head, m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_D, INTERPRET, PRECISE_PV,
            )  # fmt: skip
            slots = next_slots
            n0 += BLOCK_N
    else:
        for n0 in range(start, end, BLOCK_N):
            next_pos = n0 + BLOCK_N + offs_n
            next_slots = tl.load(slot_row + next_pos, mask=next_pos < end, other=0)
            m_i, l_i, acc = _decode_attention_block(
                q, k_buffer_ptr, v_buffer_ptr, slots.to(tl.int64), n0 + offs_n < end, stride_kn, stride_kh,
                stride_vn, stride_vh, kv_head, m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_D, INTERPRET, PRECISE_PV,
            )  # fmt: skip
            slots = next_slots
    has_keys = l_i > 0.0
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    return acc / tl.where(has_keys, l_i, 1.0)[:, None], lse


@triton.jit
def _decode_attention_stage1_kernel(
    q_ptr,
    k_buffer_ptr,
    v_buffer_ptr,
    req_to_token_ptr,
    req_pool_indices_ptr,
    seq_lens_ptr,
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    counter_ptr,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_req,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    num_kv_heads,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    MERGE_HEADS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    MERGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    INTERPRET: tl.constexpr,
    PRECISE_PV: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    req_row = tl.load(req_pool_indices_ptr + b).to(tl.int64)
    # Splits are whole blocks long so that only the last block of a split is partial.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h

    out, lse = _attend_range(
        q_ptr + b * stride_qb, heads, mask_h, k_buffer_ptr, v_buffer_ptr, req_to_token_ptr + req_row * stride_req,
        start, end, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, kv_head, qk_scale, BLOCK_H, BLOCK_N,
        HEAD_DIM, BLOCK_D, INTERPRET, PRECISE_PV,
    )  # fmt: skip
    if MERGE == MERGE_NONE:
        # One split: this is the final output.
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_h[:, None] & mask_d[None, :],
        )
    else:
        tl.store(
            partial_out_ptr + b * stride_pob + heads[:, None] * stride_poh + split * stride_pos + offs_d[None, :],
            out,
            mask=mask_h[:, None] & mask_d[None, :],
        )
        tl.store(partial_lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)
    if MERGE == MERGE_LAST_SPLIT:
        # The last of this (request, KV head)'s split programs to finish merges the group's partials, so no second
        # launch is needed. The barrier orders every thread's partial stores before the release; the counter goes
        # back to 0 for the next launch.
        tl.debug_barrier()
        counter = counter_ptr + b * num_kv_heads + kv_head
        done = tl.atomic_add(counter, 1, sem="acq_rel")
        if done == NUM_SPLITS - 1:
            _merge_splits(
                partial_out_ptr, partial_lse_ptr, out_ptr, b, kv_head * GROUP, stride_pob, stride_poh, stride_pos,
                stride_lb, stride_lh, stride_ob, stride_oh, GROUP, MERGE_HEADS, NUM_SPLITS, BLOCK_S, HEAD_DIM, BLOCK_D,
            )  # fmt: skip
            tl.atomic_xchg(counter, 0)


@triton.jit
def _merge_splits(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    b,
    head0,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, head0 : head0 + NUM_HEADS] = the log-sum-exp weighted mean of the heads' NUM_SPLITS partial outputs,
    BLOCK_G heads at a time (BLOCK_G x BLOCK_S x BLOCK_D fp32 values in registers).

    Loads bypass L1 (.cg): the partials were written by other programs, possibly on other SMs."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    for g0 in range(0, NUM_HEADS, BLOCK_G):
        _merge_heads(
            partial_out_ptr, partial_lse_ptr, out_ptr, b, head0 + g0 + offs_g, g0 + offs_g < NUM_HEADS, offs_s, offs_d,
            stride_pob, stride_poh, stride_pos, stride_lb, stride_lh, stride_ob, stride_oh, NUM_SPLITS, HEAD_DIM,
        )  # fmt: skip


@triton.jit
def _merge_heads(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    b,
    heads,
    mask_g,
    offs_s,
    offs_d,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    mask_gs = mask_g[:, None] & (offs_s < NUM_SPLITS)[None, :]
    lse = tl.load(
        partial_lse_ptr + b * stride_lb + heads[:, None] * stride_lh + offs_s[None, :],
        mask=mask_gs,
        other=float("-inf"),
        cache_modifier=".cg",
    )  # [BLOCK_G, BLOCK_S]
    m = tl.maximum(tl.max(lse, 1), -1.0e30)
    w = tl.exp2(lse - m[:, None])  # empty splits weigh 0
    denom = tl.sum(w, 1)
    partial = tl.load(
        partial_out_ptr
        + b * stride_pob
        + heads[:, None, None] * stride_poh
        + offs_s[None, :, None] * stride_pos
        + offs_d[None, None, :],
        mask=mask_gs[:, :, None] & (offs_d < HEAD_DIM)[None, None, :],
        other=0.0,
        cache_modifier=".cg",
    )  # [BLOCK_G, BLOCK_S, BLOCK_D]
    out = tl.sum(w[:, :, None] * partial, 1) / tl.where(denom > 0.0, denom, 1.0)[:, None]
    tl.store(
        out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=mask_g[:, None] & (offs_d < HEAD_DIM)[None, :],
    )


@triton.jit
def _decode_attention_stage2_kernel(
    partial_out_ptr,
    partial_lse_ptr,
    out_ptr,
    stride_pob,
    stride_poh,
    stride_pos,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The merge by a second launch: one program per (request, query head)."""
    _merge_splits(
        partial_out_ptr, partial_lse_ptr, out_ptr, tl.program_id(0), tl.program_id(1), stride_pob, stride_poh,
        stride_pos, stride_lb, stride_lh, stride_ob, stride_oh, 1, 1, NUM_SPLITS, BLOCK_S, HEAD_DIM, BLOCK_D,
    )  # fmt: skip


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    out: torch.Tensor | None = None,
    num_kv_splits: int | None = None,
    max_seq_len_hint: int | None = None,
    precise_pv: bool = False,
    fused_merge: bool | None = None,
) -> torch.Tensor:
    """One new token per request attends to its paged KV history.

    q [B, Hq, D]; k_buffer, v_buffer [num_slots, Hkv, D]; req_to_token [max_reqs, max_context] int32;
    req_pool_indices [B]; seq_lens [B] (keys per request, the new token's own K/V already stored).
    num_kv_splits None: chosen by `choose_num_kv_splits` from the batch, the KV heads, the SM count and the length
    bound max_seq_len_hint (else req_to_token's width). `max_seq_len_hint` (an upper bound on seq_lens known on the
    host) also caps an explicit split count at one block per split.
    precise_pv (bf16/fp16): the probabilities enter the P.V product as two half-precision parts (see
    `kernels._attention_common.dot_split_p`), so the result matches fp32 attention to about 16 bits instead of 8;
    off, they are rounded to q's dtype, as in flash attention.
    fused_merge: with several splits, the last split program of each (request, KV head) merges them instead of a
    second launch; None: FUSED_MERGE_GPU on CUDA, always under the interpreter. Its arrival counters are one buffer
    per device, so two decode_attention launches must not run concurrently on different streams with it on.
    Returns out [B, Hq, D] in q's dtype. No host sync, so it can be captured in a CUDA graph.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    batch, num_q_heads, head_dim = q.shape
    check_tensor("k_buffer", k_buffer, ndim=3, dtypes=(q.dtype,), device=q.device, last_dim_contiguous=True)
    num_kv_heads = k_buffer.shape[1]
    check_tensor("k_buffer", k_buffer, shape=(None, num_kv_heads, head_dim))
    check_tensor(
        "v_buffer",
        v_buffer,
        ndim=3,
        dtypes=(q.dtype,),
        shape=tuple(k_buffer.shape),
        device=q.device,
        last_dim_contiguous=True,
    )
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q has {num_q_heads} heads, not a multiple of k_buffer's {num_kv_heads} KV heads")
    check_tensor("req_to_token", req_to_token, ndim=2, dtypes=INDEX_DTYPES, device=q.device, last_dim_contiguous=True)
    check_tensor("req_pool_indices", req_pool_indices, ndim=1, dtypes=INDEX_DTYPES, shape=(batch,), device=q.device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, shape=(batch,), device=q.device)
    if req_pool_indices.stride(0) != 1 and batch > 1:
        raise ValueError("req_pool_indices must be contiguous")
    if seq_lens.stride(0) != 1 and batch > 1:
        raise ValueError("seq_lens must be contiguous")
    if num_kv_splits is not None and (not isinstance(num_kv_splits, int) or num_kv_splits < 1):
        raise ValueError(f"num_kv_splits must be None or a python int >= 1, got {num_kv_splits!r}")
    if fused_merge is not None and not isinstance(fused_merge, bool):
        raise ValueError(f"fused_merge must be None or a bool, got {fused_merge!r}")
    check_out("out", out, (batch, num_q_heads, head_dim), q.dtype, q.device)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0:
        return out

    interpret = on_interpreter(q)
    block_n = decode_block_n(head_dim, q.element_size(), interpret)
    sm_count = num_sms(q.device)
    precise = precise_pv_applies(q.dtype, precise_pv)
    max_seq_len = req_to_token.shape[1] if max_seq_len_hint is None else max_seq_len_hint
    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(
            batch, num_kv_heads, max_seq_len, block_n, sm_count, programs_per_sm(q.dtype, precise_pv)
        )
    elif max_seq_len_hint is not None:
        num_kv_splits = max(1, min(num_kv_splits, triton.cdiv(max_seq_len_hint, block_n)))
    group = num_q_heads // num_kv_heads
    block_h = max(16, next_pow2(group))  # tl.dot needs M >= 16
    block_d = next_pow2(head_dim)

    if fused_merge is None:
        fused_merge = interpret or FUSED_MERGE_GPU
    counters = _merge_counters(q.device, batch * num_kv_heads) if fused_merge and num_kv_splits > 1 else None
    if num_kv_splits == 1:
        merge = MERGE_NONE
    else:
        merge = MERGE_LAST_SPLIT if counters is not None else MERGE_KERNEL
    if merge == MERGE_NONE:
        partial_out = partial_lse = out  # unused
    else:
        # fp32 scratch: [B, Hq, splits, D] partial outputs and [B, Hq, splits] log2-sum-exp.
        partial_out = torch.empty((batch, num_q_heads, num_kv_splits, head_dim), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((batch, num_q_heads, num_kv_splits), dtype=torch.float32, device=q.device)

    stages = NUM_STAGES_GPU or decode_num_stages(batch * num_kv_heads * num_kv_splits, sm_count)
    gpu_opts = {} if interpret else {"num_warps": NUM_WARPS_GPU, "num_stages": stages}
    _decode_attention_stage1_kernel[(batch, num_kv_heads, num_kv_splits)](
        q,
        k_buffer,
        v_buffer,
        req_to_token,
        req_pool_indices,
        seq_lens,
        partial_out,
        partial_lse,
        out,
        out if counters is None else counters,
        sm_scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        req_to_token.stride(0),
        *(partial_out.stride()[:3] if merge != MERGE_NONE else (0, 0, 0)),
        *(partial_lse.stride()[:2] if merge != MERGE_NONE else (0, 0)),
        out.stride(0),
        out.stride(1),
        num_kv_heads,
        GROUP=group,
        BLOCK_H=block_h,
        MERGE_HEADS=merge_heads(group, next_pow2(num_kv_splits), block_d),
        BLOCK_S=next_pow2(num_kv_splits),
        MERGE=merge,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        NUM_SPLITS=num_kv_splits,
        INTERPRET=interpret,
        PRECISE_PV=precise,
        **gpu_opts,
    )
    if merge == MERGE_KERNEL:
        _decode_attention_stage2_kernel[(batch, num_q_heads)](
            partial_out,
            partial_lse,
            out,
            partial_out.stride(0),
            partial_out.stride(1),
            partial_out.stride(2),
            partial_lse.stride(0),
            partial_lse.stride(1),
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=num_kv_splits,
            BLOCK_S=next_pow2(num_kv_splits),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            **({} if interpret else {"num_warps": 4}),
        )
    return out


def _merge_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """This device's zeroed int32 counters, at least n; None while a CUDA graph is being captured and the buffer is
    missing or too small (allocating then would tie it to the graph's memory pool): the caller merges by launch."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _RETIRED_COUNTERS.append(buf)  # graphs captured earlier still point at it
        buf = _COUNTERS[device] = torch.zeros(max(n, _MIN_COUNTERS), dtype=torch.int32, device=device)
    return buf


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Pure-torch decode attention in fp32 (one request at a time); requests with no keys get zeros."""
    batch, num_q_heads, head_dim = q.shape
    group = num_q_heads // k_buffer.shape[1]
    out = torch.zeros((batch, num_q_heads, head_dim), dtype=torch.float32, device=q.device)
    for b in range(batch):
        seq_len = int(seq_lens[b])
        if seq_len == 0:
            continue
        slots = req_to_token[int(req_pool_indices[b]), :seq_len].long()
        k = k_buffer[slots].float().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = v_buffer[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * sm_scale  # [Hq, L]
        out[b] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v)
    return out.to(q.dtype)
