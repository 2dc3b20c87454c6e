"""Few-row linear layers (decode at small batch) with the neighbouring elementwise ops fused in.

At batch 1 a small model's decode step is a chain of tiny matmuls, norms and activations whose cost is mostly
launches and memory round trips, not bandwidth. `fused_linear` does one layer's y = x @ W^T with, optionally,

- an RMSNorm prologue: every program normalises the (few) input rows itself, so the norm needs no launch;
- a SwiGLU epilogue: W holds gate rows then up rows, and y = silu(x Wg^T) * (x Wu^T);
- a residual epilogue: residual += y, in place (each program owns its output columns).

Rounding follows the unfused torch ops exactly (every intermediate they store in the model dtype is rounded here
too); only the fp32 summation order of the dot products differs, as between any two matmul implementations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_tensor, next_pow2, num_sms

MAX_ROWS = 8
# Elements of W one program holds in registers (per matrix: gate and up count separately).
_TILE = 8192


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    norm_w_ptr,
    res_ptr,
    out_ptr,
    M,
    eps,
    stride_x,
    stride_w,
    stride_r,
    stride_o,
    N: tl.constexpr,
    K: tl.constexpr,
    UP: tl.constexpr,
    MAX_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    SILU_MUL: tl.constexpr,
    RESIDUAL: tl.constexpr,
):
    dt = x_ptr.dtype.element_ty
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_w
    for m in tl.static_range(MAX_M):
        if m < M:
            x_row = x_ptr + m * stride_x
            inv_rms = 1.0
            if NORM:
                ss = tl.zeros([BLOCK_K], dtype=tl.float32)
                for k0 in tl.static_range(0, K, BLOCK_K):
                    xk = tl.load(x_row + k0 + offs_k, mask=k0 + offs_k < K, other=0.0).to(tl.float32)
                    ss += xk * xk
                inv_rms = 1.0 / tl.sqrt(tl.sum(ss, 0) / K + eps)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
            for k0 in tl.static_range(0, K, BLOCK_K):
                kk = k0 + offs_k
                mask_k = kk < K
                xk = tl.load(x_row + kk, mask=mask_k, other=0.0).to(tl.float32)
                if NORM:
                    # as rms_norm_ref: normalised row rounded, times the weight, rounded
                    g = tl.load(norm_w_ptr + kk, mask=mask_k, other=0.0).to(tl.float32)
                    xk = ((xk * inv_rms).to(dt).to(tl.float32) * g).to(dt).to(tl.float32)
                wmask = mask_n[:, None] & mask_k[None, :]
                w = tl.load(w_rows + kk[None, :], mask=wmask, other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_K]
                acc += tl.sum(w * xk[None, :], 1)
                if SILU_MUL:
                    wu = tl.load(w_rows + UP * stride_w + kk[None, :], mask=wmask, other=0.0).to(tl.float32)
                    acc_up += tl.sum(wu * xk[None, :], 1)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            y = acc.to(dt).to(tl.float32)  # the linear's stored output
            if SILU_MUL:
                act = (y / (1.0 + tl.exp(-y))).to(dt).to(tl.float32)
                y = (act * acc_up.to(dt).to(tl.float32)).to(dt).to(tl.float32)
            if RESIDUAL:
                r = tl.load(res_ptr + m * stride_r + offs_n, mask=mask_n, other=0.0).to(tl.float32)
                y = y + r
            tl.store(out_ptr + m * stride_o + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)


def fused_linear_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fused_linear` takes this call: 2-D inputs of at most MAX_ROWS rows, unit inner strides."""
    return (
        x.dim() == 2
        and 0 < x.shape[0] <= MAX_ROWS
        and weight.dim() == 2
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and x.dtype == weight.dtype
    )


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS), weight [N, K] -> [M, N], or [M, N/2] with silu_mul.

    norm_weight [K]: x is first replaced by rms_norm(x) * norm_weight. residual [M, N']: the result is added to it
    in place and residual is returned. Without either it is F.linear(x, weight, bias).
    """
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    m, k = x.shape
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"fused_linear takes 1..{MAX_ROWS} rows, got {m}")
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), shape=(None, k), device=x.device,
                 last_dim_contiguous=True)  # fmt: skip
    rows = weight.shape[0]
    if silu_mul:
        if rows % 2:
            raise ValueError(f"silu_mul needs gate and up halves: weight has an odd number of rows ({rows})")
        if bias is not None:
            raise ValueError("silu_mul takes no bias")
    n = rows // 2 if silu_mul else rows
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(rows,), device=x.device)
        if bias.stride(0) != 1:
            raise ValueError("bias must be contiguous")
    if norm_weight is not None:
        check_tensor("norm_weight", norm_weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(k,), device=x.device)
        if norm_weight.stride(0) != 1:
            raise ValueError("norm_weight must be contiguous")
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), shape=(m, n), device=x.device,
                     last_dim_contiguous=True)  # fmt: skip
        if out is not None:
            raise ValueError("with residual the result goes into residual; out must be None")
        if residual.data_ptr() == x.data_ptr():
            raise ValueError("residual must not be x: it is written while x is read")
        out = residual
    elif out is not None:
        check_tensor("out", out, ndim=2, dtypes=(x.dtype,), shape=(m, n), device=x.device, last_dim_contiguous=True)
    else:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_k = min(next_pow2(k), 2048)
    # One or two programs per SM, each holding at most _TILE weights per matrix in registers.
    tile = _TILE // block_k // (2 if silu_mul else 1)
    block_n = max(1, min(tile, triton.next_power_of_2(max(1, n // num_sms(x.device))) // 2))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        bias if bias is not None else x,
        norm_weight if norm_weight is not None else x,
        residual if residual is not None else x,
        out,
        m,
        float(eps),
        x.stride(0),
        weight.stride(0),
        residual.stride(0) if residual is not None else 0,
        out.stride(0),
        N=n,
        K=k,
        UP=n if silu_mul else 0,
        MAX_M=next_pow2(m),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        HAS_BIAS=bias is not None,
        NORM=norm_weight is not None,
        SILU_MUL=silu_mul,
        RESIDUAL=residual is not None,
        num_warps=4,
    )
    return out


def fused_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    silu_mul: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The unfused torch ops (out of place): rms_norm_ref, F.linear, silu_and_mul_ref, residual add."""
    from kernels.activation import silu_and_mul_ref
    from kernels.norm import rms_norm_ref

    if norm_weight is not None:
        x = rms_norm_ref(x, norm_weight, eps)
    y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    if silu_mul:
        y = silu_and_mul_ref(y)
    if residual is not None:
        y = (y.float() + residual.float()).to(residual.dtype)
    return y
