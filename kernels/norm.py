"""RMSNorm and the fused residual-add + RMSNorm of a Llama decoder layer, computed in fp32 and rounded like the
unfused torch ops."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_out, check_tensor, next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    eps,
    stride_x,
    stride_r,
    stride_o,
    HIDDEN: tl.constexpr,
    BLOCK: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK]
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = (x + r).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + offs, x, mask=mask)
        x = x.to(tl.float32)  # normalise the stored (rounded) sum, as an unfused add then norm would
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, 0) / HIDDEN + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Round the normalised row to the output dtype before the weight multiply, as `weight * norm(x).to(dtype)`
    # does (transformers' Llama RMSNorm): the fused path then rounds exactly like the unfused one.
    normed = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """[..., H] -> [rows, H] view (no copy) with a unit last stride."""
    check_tensor(name, t, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    if t.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dim")
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError as e:
        raise ValueError(f"{name} of shape {tuple(t.shape)} and strides {t.stride()} cannot be viewed as rows") from e


def _launch(x2, residual2, weight, out2, eps):
    hidden = x2.shape[1]
    if x2.shape[0] == 0:
        return
    block = next_pow2(hidden)
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        residual2 if residual2 is not None else x2,
        weight,
        out2,
        eps,
        x2.stride(0),
        residual2.stride(0) if residual2 is not None else 0,
        out2.stride(0),
        HIDDEN=hidden,
        BLOCK=block,
        ADD_RESIDUAL=residual2 is not None,
        num_warps=min(16, max(1, block // 256)),
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., H], weight [H] -> x / rms(x) * weight, in x's dtype (fp32 inside)."""
    x2 = _rows("x", x)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(x.shape[-1],), device=x.device)
    if weight.stride(0) != 1 and weight.shape[0] > 1:
        raise ValueError("weight must be contiguous")
    check_out("out", out, tuple(x.shape), x.dtype, x.device)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x2, None, weight, _rows("out", out), eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual += x, then x = rms_norm(residual) * weight. x, residual [..., H]. Returns (x, residual)."""
    x2 = _rows("x", x)
    check_tensor("residual", residual, shape=tuple(x.shape), ndim=x.dim(), dtypes=(x.dtype,), device=x.device)
    residual2 = _rows("residual", residual)
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(x.shape[-1],), device=x.device)
    if weight.stride(0) != 1 and weight.shape[0] > 1:
        raise ValueError("weight must be contiguous")
    _launch(x2, residual2, weight, x2, eps)
    return x, residual


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float()
    return (normed * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Out-of-place reference: returns (rms_norm(x + residual) * weight, x + residual)."""
    new_residual = (x.float() + residual.float()).to(residual.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual
