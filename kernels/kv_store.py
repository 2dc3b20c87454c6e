"""Scatter the new tokens' K/V into the paged KV cache (SGLang's `set_kv_buffer`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_tensor, next_pow2


@triton.jit
def _store_kv_kernel(
    k_buffer_ptr,
    v_buffer_ptr,
    loc_ptr,
    k_ptr,
    v_ptr,
    stride_kbn,
    stride_kbh,
    stride_vbn,
    stride_vbh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(loc_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src = token.to(tl.int64)
    k = tl.load(
        k_ptr + src * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask
    )  # [BLOCK_H, BLOCK_D]
    tl.store(k_buffer_ptr + slot * stride_kbn + offs_h[:, None] * stride_kbh + offs_d[None, :], k, mask=mask)
    v = tl.load(v_ptr + src * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(v_buffer_ptr + slot * stride_vbn + offs_h[:, None] * stride_vbh + offs_d[None, :], v, mask=mask)


def store_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """k_buffer[loc] = k and v_buffer[loc] = v, in place.

    k_buffer, v_buffer [num_slots, Hkv, D]; loc [N] int64 slot indices (distinct); k, v [N, Hkv, D], same dtype as
    the buffers.
    """
    check_tensor("k_buffer", k_buffer, ndim=3, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    _, num_heads, head_dim = k_buffer.shape
    device = k_buffer.device
    check_tensor(
        "v_buffer", v_buffer, ndim=3, dtypes=(k_buffer.dtype,), shape=tuple(k_buffer.shape), device=device,
        last_dim_contiguous=True,
    )  # fmt: skip
    check_tensor("loc", loc, ndim=1, dtypes=(torch.int64, torch.int32), device=device)
    num_tokens = loc.shape[0]
    if num_tokens > 1 and loc.stride(0) != 1:
        raise ValueError("loc must be contiguous")
    for name, t in (("k", k), ("v", v)):
        check_tensor(
            name, t, ndim=3, dtypes=(k_buffer.dtype,), shape=(num_tokens, num_heads, head_dim), device=device,
            last_dim_contiguous=True,
        )  # fmt: skip
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k_buffer,
        v_buffer,
        loc,
        k,
        v,
        k_buffer.stride(0),
        k_buffer.stride(1),
        v_buffer.stride(0),
        v_buffer.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_heads),
        BLOCK_D=next_pow2(head_dim),
    )


def store_kv_ref(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    k_buffer[loc.long()] = k
    v_buffer[loc.long()] = v
