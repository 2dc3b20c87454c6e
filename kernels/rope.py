"""Rotary position embedding, neox / rotate-half style, applied in place to q and k; optionally the same launch
writes the rotated k and v into the paged KV cache (one kernel per layer instead of two)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, INDEX_DTYPES, check_tensor, next_pow2


@triton.jit
def _rotate_heads(
    x_ptr, token, stride_n, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """x[token, :, :2*HALF] = (x1 cos - x2 sin, x2 cos + x1 sin), x1/x2 the halves; cos, sin [BLOCK_HALF]."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HALF)[None, :]
    ptr1 = x_ptr + token * stride_n + offs_h[:, None] * stride_h + offs_d[None, :]  # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(ptr1, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _apply_rope_kernel(
    q_ptr,
    k_ptr,
    positions_ptr,
    cos_sin_ptr,
    v_ptr,
    k_buffer_ptr,
    v_buffer_ptr,
    loc_ptr,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_cs,
    stride_vn,
    stride_vh,
    stride_kbn,
    stride_kbh,
    stride_vbn,
    stride_vbh,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_QH: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_KV: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, token, stride_qn, stride_qh, cos, sin, NUM_Q_HEADS, HALF, BLOCK_QH, BLOCK_HALF)
    _rotate_heads(k_ptr, token, stride_kn, stride_kh, cos, sin, NUM_K_HEADS, HALF, BLOCK_KH, BLOCK_HALF)
    if STORE_KV:
        tl.debug_barrier()  # the rotated k rows above were written by other threads of this program
        slot = tl.load(loc_ptr + token).to(tl.int64)
        offs_h = tl.arange(0, BLOCK_KH)
        offs_full = tl.arange(0, BLOCK_D)
        mask = (offs_h < NUM_K_HEADS)[:, None] & (offs_full < HEAD_DIM)[None, :]
        k = tl.load(k_ptr + token * stride_kn + offs_h[:, None] * stride_kh + offs_full[None, :], mask=mask)
        tl.store(k_buffer_ptr + slot * stride_kbn + offs_h[:, None] * stride_kbh + offs_full[None, :], k, mask=mask)
        v = tl.load(v_ptr + token * stride_vn + offs_h[:, None] * stride_vh + offs_full[None, :], mask=mask)
        tl.store(v_buffer_ptr + slot * stride_vbn + offs_h[:, None] * stride_vbh + offs_full[None, :], v, mask=mask)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    v: torch.Tensor | None = None,
    k_buffer: torch.Tensor | None = None,
    v_buffer: torch.Tensor | None = None,
    loc: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place on q [N, Hq, D] and k [N, Hkv, D]; positions [N]; cos_sin [P, R] with cos(pos * inv_freq) in
    [:, :R/2] and sin in [:, R/2:] (specbundle.layers.RotaryEmbedding.cos_sin). R = D is full rotary; R < D rotates
    the first R dims only. Returns (q, k).

    With k_buffer, v_buffer [num_slots, Hkv, D] and loc [N] (distinct slots), also k_buffer[loc] = rotated k and
    v_buffer[loc] = v [N, Hkv, D] (what `store_kv` does, in the same launch)."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    num_tokens, num_q_heads, head_dim = q.shape
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, shape=(num_tokens, None, head_dim), device=q.device)
    check_tensor("k", k, last_dim_contiguous=True)
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, shape=(num_tokens,), device=q.device)
    check_tensor("cos_sin", cos_sin, ndim=2, dtypes=FLOAT_DTYPES, device=q.device, last_dim_contiguous=True)
    rotary_dim = cos_sin.shape[1]
    if rotary_dim % 2 or rotary_dim > head_dim or rotary_dim == 0:
        raise ValueError(f"cos_sin's last dim must be even, nonzero and <= head dim {head_dim}, got {rotary_dim}")
    store = k_buffer is not None
    if store != (v_buffer is not None) or store != (loc is not None) or store != (v is not None):
        raise ValueError("storing K/V needs all of v, k_buffer, v_buffer and loc (or none of them)")
    num_kv_heads = k.shape[1]
    if store:
        for name, t in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
            check_tensor(
                name, t, ndim=3, dtypes=(k.dtype,), shape=(None, num_kv_heads, head_dim), device=q.device,
                last_dim_contiguous=True,
            )  # fmt: skip
        check_tensor("v", v, ndim=3, dtypes=(k.dtype,), shape=tuple(k.shape), device=q.device, last_dim_contiguous=True)
        check_tensor("loc", loc, ndim=1, dtypes=INDEX_DTYPES, shape=(num_tokens,), device=q.device)
    if num_tokens == 0:
        return q, k
    half = rotary_dim // 2
    dummy = k  # never read when STORE_KV is off
    _apply_rope_kernel[(num_tokens,)](
        q,
        k,
        positions.contiguous(),
        cos_sin,
        v if store else dummy,
        k_buffer if store else dummy,
        v_buffer if store else dummy,
        loc.contiguous() if store else positions,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin.stride(0),
        v.stride(0) if store else 0,
        v.stride(1) if store else 0,
        k_buffer.stride(0) if store else 0,
        k_buffer.stride(1) if store else 0,
        v_buffer.stride(0) if store else 0,
        v_buffer.stride(1) if store else 0,
        NUM_Q_HEADS=num_q_heads,
        NUM_K_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_QH=next_pow2(num_q_heads),
        BLOCK_KH=next_pow2(num_kv_heads),
        BLOCK_HALF=next_pow2(half),
        HEAD_DIM=head_dim,
        BLOCK_D=next_pow2(head_dim),
        STORE_KV=store,
    )
    return q, k


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place reference: returns rotated copies of q and k."""
    rotary_dim = cos_sin.shape[1]
    cos, sin = cos_sin[positions.long()].float().unsqueeze(1).chunk(2, dim=-1)  # [N, 1, R/2]

    def rotate(x):
        x1, x2, rest = x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim], x[..., rotary_dim:]
        x1, x2 = x1.float(), x2.float()
        return torch.cat([(x1 * cos - x2 * sin).to(x.dtype), (x2 * cos + x1 * sin).to(x.dtype), rest], dim=-1)

    return rotate(q), rotate(k)
