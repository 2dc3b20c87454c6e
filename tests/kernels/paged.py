"""Builders of small SGLang-layout paged KV caches for the kernel tests, and the device they run on."""

from __future__ import annotations

import torch

# The kernels run compiled on a GPU when there is one, else in the Triton interpreter on CPU tensors. Random data is
# always drawn from seeded CPU generators and then moved, so both devices see the same values.
DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

# atol/rtol per dtype: fp32 differs only by summation order; fp16/bf16 by rounding of the output (bf16: 8 bits).
TOLERANCES = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
}


def make_paged_cache(
    context_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0, spare_rows: int = 2
):
    """Random K/V buffers and a req_to_token table whose rows map each request to scattered, distinct slots.

    Returns k_buffer, v_buffer [num_slots, Hkv, D], req_to_token [max_reqs, max_context] int32 and
    req_pool_indices [B] int64 (deliberately not 0..B-1), all on DEVICE.
    """
    gen = torch.Generator().manual_seed(seed)
    batch = len(context_lens)
    max_context = max(max(context_lens), 1) + 3
    num_slots = sum(context_lens) + 17
    k_buffer = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_buffer = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    max_reqs = batch + spare_rows
    req_to_token = torch.randint(0, num_slots, (max_reqs, max_context), generator=gen, dtype=torch.int32)
    req_pool_indices = torch.randperm(max_reqs, generator=gen)[:batch].to(torch.int64)
    perm = torch.randperm(num_slots, generator=gen).to(torch.int32)
    used = 0
    for b, n in enumerate(context_lens):
        req_to_token[req_pool_indices[b], :n] = perm[used : used + n]
        used += n
    return to_device((k_buffer, v_buffer, req_to_token, req_pool_indices))


def to_device(x):
    """x with every tensor in it moved to DEVICE: a tensor, or a dict / list / tuple (other values pass through)."""
    if isinstance(x, torch.Tensor):
        return x.to(DEVICE)
    if isinstance(x, dict):
        return {k: to_device(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v) for v in x)
    return x


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard-normal values from a seeded CPU generator, as `dtype` on DEVICE."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEVICE)
