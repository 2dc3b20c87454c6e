"""SwiGLU gate: silu(gate) * up on the fused gate_up projection output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import FLOAT_DTYPES, check_out, check_tensor, next_pow2


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + INTER + offs, mask=mask, other=0.0).to(tl.float32)
    # silu rounded to the output dtype before the multiply, as torch's `F.silu(gate) * up` rounds.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    out = act * up
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, 2I] (gate then up) -> [N, I] = silu(x[:, :I]) * x[:, I:], fp32 inside (silu rounded to x's dtype)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    num_rows, width = x.shape
    if width % 2:
        raise ValueError(f"x's last dim must be even (gate and up halves), got {width}")
    inter = width // 2
    check_out("out", out, (num_rows, inter), x.dtype, x.device)
    if out is None:
        out = torch.empty((num_rows, inter), dtype=x.dtype, device=x.device)
    if num_rows == 0 or inter == 0:
        return out
    block = min(1024, next_pow2(inter))
    _silu_and_mul_kernel[(num_rows, triton.cdiv(inter, block))](
        x, out, x.stride(0), out.stride(0), INTER=inter, BLOCK=block
    )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate).to(x.dtype).float()
    return (act * up).to(x.dtype)
