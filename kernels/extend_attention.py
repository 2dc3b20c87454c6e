"""Extend attention: new tokens attend to their request's paged prefix and to the request's new tokens.

Without a mask the new tokens attend causally (prefill and chunked prefill); with `custom_mask` [B, E, E] they
attend as the mask says (tree verification: every tree node sees the whole prefix and its own ancestors).
One program handles BLOCK_M new tokens x all query heads of one KV head, so the K/V of that head is read once
per token block rather than once per query head.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, INDEX_DTYPES, check_out, check_tensor, next_pow2, on_interpreter

_LOG2E = 1.4426950408889634


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
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


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
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_CUSTOM_MASK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    m_block = tl.program_id(2)

    extend_len = tl.load(extend_lens_ptr + b).to(tl.int32)
    if m_block * BLOCK_M < extend_len:
        prefix_len = tl.load(prefix_lens_ptr + b).to(tl.int32)
        start_loc = tl.load(extend_start_loc_ptr + b).to(tl.int64)
        req_row = tl.load(req_pool_indices_ptr + b).to(tl.int64)

        # Row r of the tile is new token r // BLOCK_G (within this block) and query head r % BLOCK_G of the group.
        offs_r = tl.arange(0, BLOCK_M * BLOCK_G)
        tok = m_block * BLOCK_M + offs_r // BLOCK_G  # [R] index among the request's new tokens
        head = kv_head * GROUP + offs_r % BLOCK_G
        mask_r = (tok < extend_len) & (offs_r % BLOCK_G < GROUP)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        mask_d = offs_d < HEAD_DIM
        q_rows = start_loc + tok
        q = tl.load(
            q_ptr + q_rows[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :],
            mask=mask_r[:, None] & mask_d[None, :],
            other=0.0,
        )  # [R, BLOCK_D]
        if INTERPRET:
            q = q.to(tl.float32)

        m_i = tl.full([BLOCK_M * BLOCK_G], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M * BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], dtype=tl.float32)

        # Prefix: every new token sees all of it.
        k_prefix = k_buffer_ptr + kv_head * stride_kbh
        v_prefix = v_buffer_ptr + kv_head * stride_vbh
        if INTERPRET:
            # The interpreter (numpy >= 2) cannot use tensors as range() bounds.
            n0 = prefix_len * 0
            while n0 < prefix_len:
                pos = n0 + offs_n
                mask_n = pos < prefix_len
                slots = tl.load(req_to_token_ptr + req_row * stride_req + pos, mask=mask_n, other=0).to(tl.int64)
                m_i, l_i, acc = _extend_attention_block(
                    q, k_prefix, v_prefix, slots, mask_n, stride_kbn, stride_vbn, mask_n[None, :], m_i, l_i, acc,
                    qk_scale, HEAD_DIM, BLOCK_D, INTERPRET,
                )  # fmt: skip
                n0 += BLOCK_N
        else:
            for n0 in range(0, prefix_len, BLOCK_N):
                pos = n0 + offs_n
                mask_n = pos < prefix_len
                slots = tl.load(req_to_token_ptr + req_row * stride_req + pos, mask=mask_n, other=0).to(tl.int64)
                m_i, l_i, acc = _extend_attention_block(
                    q, k_prefix, v_prefix, slots, mask_n, stride_kbn, stride_vbn, mask_n[None, :], m_i, l_i, acc,
                    qk_scale, HEAD_DIM, BLOCK_D, INTERPRET,
                )  # fmt: skip

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
                pos = n0 + offs_n
                mask_n = pos < extend_len
                if USE_CUSTOM_MASK:
                    seen = tl.load(mask_base + pos[None, :], mask=mask_r[:, None] & mask_n[None, :], other=0)
                    allowed = (seen != 0) & mask_n[None, :]
                else:
                    allowed = (pos[None, :] <= tok[:, None]) & mask_n[None, :]
                m_i, l_i, acc = _extend_attention_block(
                    q, k_new, v_new, start_loc + pos, mask_n, stride_kn, stride_vn, allowed, m_i, l_i, acc,
                    qk_scale, HEAD_DIM, BLOCK_D, INTERPRET,
                )  # fmt: skip
                n0 += BLOCK_N
        else:
            for n0 in range(0, extend_end, BLOCK_N):
                pos = n0 + offs_n
                mask_n = pos < extend_len
                if USE_CUSTOM_MASK:
                    seen = tl.load(mask_base + pos[None, :], mask=mask_r[:, None] & mask_n[None, :], other=0)
                    allowed = (seen != 0) & mask_n[None, :]
                else:
                    allowed = (pos[None, :] <= tok[:, None]) & mask_n[None, :]
                m_i, l_i, acc = _extend_attention_block(
                    q, k_new, v_new, start_loc + pos, mask_n, stride_kn, stride_vn, allowed, m_i, l_i, acc,
                    qk_scale, HEAD_DIM, BLOCK_D, INTERPRET,
                )  # fmt: skip

        # A token that sees nothing (possible only under a custom mask with no prefix) gets zeros.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=mask_r[:, None] & mask_d[None, :],
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
) -> torch.Tensor:
    """Attention of N new tokens (B requests, packed) over their paged prefixes and themselves.

    q [N, Hq, D]; k, v [N, Hkv, D] (the new tokens' keys/values, same rows as q); k_buffer, v_buffer
    [num_slots, Hkv, D]; req_to_token [max_reqs, max_context]; req_pool_indices, prefix_lens, extend_lens,
    extend_start_loc [B] (request b owns rows extend_start_loc[b] : extend_start_loc[b] + extend_lens[b] of q);
    max_extend_len >= max(extend_lens) (host int: it fixes the grid); custom_mask bool [B, E, E], E = max_extend_len,
    mask[b, i, j] = new token i may see new token j (None = causal). Returns out [N, Hq, D] in q's dtype; rows of
    q owned by no request are left untouched. No host sync, so it can be captured in a CUDA graph.
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
    check_out("out", out, (num_tokens, num_q_heads, head_dim), q.dtype, q.device)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or max_extend_len == 0:
        return out

    interpret = on_interpreter(q)
    group = num_q_heads // num_kv_heads
    block_g = next_pow2(group)
    # R = BLOCK_M * BLOCK_G query rows per program; tl.dot needs R >= 16.
    rows = 16 if interpret else (128 if head_dim <= 128 else 64)
    block_m = max(1, rows // block_g)
    block_m = min(block_m, max(next_pow2(max_extend_len), max(1, 16 // block_g)))
    block_n = 16 if interpret else 64
    mask_arg = custom_mask.view(torch.uint8) if custom_mask is not None else q  # q: a dummy, never read
    gpu_opts = {} if interpret else {"num_warps": 8 if block_m * block_g >= 128 else 4, "num_stages": 2}
    grid = (batch, num_kv_heads, triton.cdiv(max_extend_len, block_m))
    _extend_attention_kernel[grid](
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
        GROUP=group,
        BLOCK_G=block_g,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        USE_CUSTOM_MASK=custom_mask is not None,
        INTERPRET=interpret,
        **gpu_opts,
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
