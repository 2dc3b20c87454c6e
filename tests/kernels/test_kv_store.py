import pytest
import torch

from kernels.kv_store import store_kv, store_kv_ref
from tests.kernels.paged import DEVICE, to_device


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_heads,head_dim", [(1, 1, 64), (7, 8, 128), (37, 3, 64)])
def test_store_kv_matches_reference(dtype, num_tokens, num_heads, head_dim):
    gen = torch.Generator().manual_seed(num_tokens)
    num_slots = 50
    k_buffer = torch.randn(num_slots, num_heads, head_dim, generator=gen).to(dtype)
    v_buffer = torch.randn(num_slots, num_heads, head_dim, generator=gen).to(dtype)
    loc = torch.randperm(num_slots, generator=gen)[:num_tokens]
    # Non-contiguous sources: k, v are head-slices of a fused [N, 2 * Hkv, D] tensor.
    kv = torch.randn(num_tokens, 2 * num_heads, head_dim, generator=gen).to(dtype)
    k_buffer, v_buffer, loc, kv = to_device((k_buffer, v_buffer, loc, kv))
    k, v = kv[:, :num_heads], kv[:, num_heads:]
    kb_ref, vb_ref = k_buffer.clone(), v_buffer.clone()
    store_kv(k_buffer, v_buffer, loc, k, v)
    store_kv_ref(kb_ref, vb_ref, loc, k, v)
    assert k_buffer.device == DEVICE
    assert torch.equal(k_buffer.cpu(), kb_ref.cpu()) and torch.equal(v_buffer.cpu(), vb_ref.cpu())
    assert torch.equal(k_buffer[loc].cpu(), k.cpu())


def test_store_kv_rejects_bad_arguments():
    buf = torch.zeros(10, 2, 64, device=DEVICE)
    k = torch.randn(3, 2, 64, device=DEVICE)
    loc = torch.tensor([1, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match="loc"):
        store_kv(buf, buf.clone(), loc.float(), k, k)
    with pytest.raises(ValueError, match="^v has"):
        store_kv(buf, buf.clone(), loc, k, k[:, :1])
    with pytest.raises(ValueError, match="^k must have dtype"):
        store_kv(buf, buf.clone(), loc, k.half(), k)
