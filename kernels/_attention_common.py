"""Device helpers shared by the attention kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dot_split_p(p, v, acc):
    """acc + p @ v for fp32 probabilities p [R, N] and half-precision values v [N, D], at about fp32 accuracy.

    Rounding p to v's dtype (flash attention's usual step) keeps 8 mantissa bits in bf16: the output then differs
    from fp32 attention in about a quarter of its elements by one bf16 step, enough to change greedy tokens. Here p
    is split as hi + lo, both half precision (hi = p rounded, lo = the rounding error rounded), so p enters the
    product with about 16 bits; two tensor-core dots on the already loaded v, fp32 accumulation.
    """
    p_hi = p.to(v.dtype)
    p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
    acc = tl.dot(p_hi, v, acc)
    return tl.dot(p_lo, v, acc)
