import pytest
import torch

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from kernels.rope import apply_rope, apply_rope_ref
from tests.kernels.paged import DEVICE, ON_GPU, to_device

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Elementwise ops computed in fp32. RMSNorm and SiLU-and-mul round twice (the intermediate to the storage dtype,
# as the unfused torch ops do), so an rsqrt / exp ulp can move a result by up to two ulps of the dtype.
TOL = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 2e-2, "rtol": 1.6e-2},
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (7, 123), (2, 5, 576)])
def test_rms_norm_matches_reference(dtype, shape):
    x = (3 * torch.randn(shape, generator=_gen())).to(dtype).to(DEVICE)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=_gen(1))).to(dtype).to(DEVICE)
    out = rms_norm(x, weight, 1e-6)
    assert out.device == DEVICE
    torch.testing.assert_close(out.cpu(), rms_norm_ref(x, weight, 1e-6).cpu(), **TOL[dtype])
    buf = torch.empty_like(x)
    assert rms_norm(x, weight, 1e-6, out=buf) is buf
    torch.testing.assert_close(buf.cpu(), out.cpu(), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 64), (37, 123)])
def test_fused_add_rms_norm_in_place(dtype, shape):
    x = torch.randn(shape, generator=_gen()).to(dtype).to(DEVICE)
    residual = torch.randn(shape, generator=_gen(1)).to(dtype).to(DEVICE)
    weight = torch.rand(shape[-1], generator=_gen(2)).to(dtype).to(DEVICE)
    want_x, want_residual = fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    x_ptr, r_ptr = x.data_ptr(), residual.data_ptr()
    got_x, got_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert got_x.data_ptr() == x_ptr and got_residual.data_ptr() == r_ptr
    # The sum is rounded once either way; only the interpreter's fp32 -> bf16 cast truncates (1 ulp) where
    # GPUs round to nearest, so on a GPU the residual must match exactly.
    exact = {"atol": 0, "rtol": 2**-7 if dtype == torch.bfloat16 and not ON_GPU else 0}
    torch.testing.assert_close(got_residual.cpu(), want_residual.cpu(), **exact)
    torch.testing.assert_close(got_x.cpu(), want_x.cpu(), **TOL[dtype])


def test_norm_rejects_bad_arguments():
    x = torch.randn(3, 8, device=DEVICE)
    ones = torch.ones(8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, ones[:7], 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rms_norm(x, torch.randn(3, 8, device=DEVICE).half(), ones, 1e-6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        rms_norm(x.t(), ones[:3], 1e-6)


def _cos_sin(max_positions, rotary_dim, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, R/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)  # [P, R], as RotaryEmbedding.cos_sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens,num_q_heads,num_kv_heads,head_dim", [(1, 4, 1, 64), (7, 32, 8, 128), (37, 5, 5, 64), (7, 9, 3, 64)]
)
def test_apply_rope_matches_reference(dtype, num_tokens, num_q_heads, num_kv_heads, head_dim):
    gen = _gen(num_tokens)
    cos_sin = _cos_sin(200, head_dim)
    positions = torch.randint(0, 200, (num_tokens,), generator=gen).to(DEVICE)
    # k as a head-slice of a fused qkv tensor: a non-contiguous token stride
    qkv = torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k = qkv[:, :num_q_heads].clone(), qkv[:, num_q_heads : num_q_heads + num_kv_heads]
    v_before = qkv[:, num_q_heads + num_kv_heads :].clone()
    want_q, want_k = apply_rope_ref(q, k, positions, cos_sin)
    got_q, got_k = apply_rope(q, k, positions, cos_sin)
    assert got_q is q and got_k is k
    torch.testing.assert_close(q.cpu(), want_q.cpu(), **TOL[dtype])
    torch.testing.assert_close(k.cpu(), want_k.cpu(), **TOL[dtype])
    assert torch.equal(qkv[:, num_q_heads + num_kv_heads :].cpu(), v_before.cpu())  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_tokens,num_q_heads,num_kv_heads,head_dim,rotary_dim", [(7, 9, 3, 64, 64), (5, 8, 2, 128, 64)]
)
def test_apply_rope_stores_rotated_k_and_v_in_the_cache(
    dtype, num_tokens, num_q_heads, num_kv_heads, head_dim, rotary_dim
):
    """The fused store: k_buffer[loc] holds the rotated k (partial rotary: tail as is), v_buffer[loc] v, and no
    other slot changes; q and k are rotated as without the store."""
    gen = _gen(num_tokens + 100)
    cos_sin = _cos_sin(300, rotary_dim)
    positions = torch.randint(0, 300, (num_tokens,), generator=gen).to(DEVICE)
    qkv = torch.randn(num_tokens, num_q_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    q, k = qkv[:, :num_q_heads], qkv[:, num_q_heads : num_q_heads + num_kv_heads]
    v = qkv[:, num_q_heads + num_kv_heads :]
    want_q, want_k = apply_rope_ref(q, k, positions, cos_sin)
    k_buffer = torch.randn(40, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v_buffer = torch.randn(40, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    k_before, v_before = k_buffer.clone(), v_buffer.clone()
    loc = torch.randperm(40, generator=gen)[:num_tokens].to(DEVICE)
    apply_rope(q, k, positions, cos_sin, v=v, k_buffer=k_buffer, v_buffer=v_buffer, loc=loc)
    torch.testing.assert_close(q.cpu(), want_q.cpu(), **TOL[dtype])
    torch.testing.assert_close(k.cpu(), want_k.cpu(), **TOL[dtype])
    assert torch.equal(k_buffer[loc].cpu(), k.cpu()) and torch.equal(v_buffer[loc].cpu(), v.cpu())
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[loc.cpu()] = False
    assert torch.equal(k_buffer.cpu()[untouched], k_before.cpu()[untouched])
    assert torch.equal(v_buffer.cpu()[untouched], v_before.cpu()[untouched])
    with pytest.raises(ValueError, match="all of v, k_buffer, v_buffer and loc"):
        apply_rope(q, k, positions, cos_sin, k_buffer=k_buffer, v_buffer=v_buffer, loc=loc)
    with pytest.raises(ValueError, match="loc"):
        apply_rope(q, k, positions, cos_sin, v=v, k_buffer=k_buffer, v_buffer=v_buffer, loc=loc[:1])


def test_apply_rope_matches_specbundle_formula_and_partial_rotary():
    """Full rotary equals the rotate-half formula (x1 cos - x2 sin, x2 cos + x1 sin); partial leaves the tail."""
    gen = _gen(3)
    q, k = to_device((torch.randn(5, 2, 64, generator=gen), torch.randn(5, 1, 64, generator=gen)))
    positions = torch.tensor([0, 1, 2, 50, 99], device=DEVICE)
    cos_sin = _cos_sin(100, 64)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    x1, x2 = q.chunk(2, dim=-1)
    want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    got_q, _ = apply_rope(q.clone(), k.clone(), positions, cos_sin)
    torch.testing.assert_close(got_q.cpu(), want.cpu(), atol=1e-5, rtol=1e-5)
    at_zero = apply_rope(q.clone(), k.clone(), torch.zeros(5, dtype=torch.long, device=DEVICE), cos_sin)[0]
    assert torch.equal(at_zero.cpu(), q.cpu())

    partial = _cos_sin(100, 32)
    got_q, got_k = apply_rope(q.clone(), k.clone(), positions, partial)
    assert torch.equal(got_q[..., 32:].cpu(), q[..., 32:].cpu())
    want_q = apply_rope_ref(q, k, positions, partial)[0]
    torch.testing.assert_close(got_q.cpu(), want_q.cpu(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cos_sin"):
        apply_rope(q, k, positions, _cos_sin(100, 128))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_rows,inter", [(1, 64), (7, 123), (3, 1536)])
def test_silu_and_mul_matches_reference(dtype, num_rows, inter):
    x = (4 * torch.randn(num_rows, 2 * inter, generator=_gen())).to(dtype).to(DEVICE)
    out = silu_and_mul(x)
    assert out.shape == (num_rows, inter) and out.device == DEVICE
    torch.testing.assert_close(out.cpu(), silu_and_mul_ref(x).cpu(), **TOL[dtype])
    gate, up = x.float().cpu().chunk(2, dim=-1)
    torch.testing.assert_close(out.float().cpu(), (gate * torch.sigmoid(gate) * up), **TOL[dtype])
    buf = torch.empty(num_rows, inter, dtype=dtype, device=DEVICE)
    assert silu_and_mul(x, out=buf) is buf


def test_silu_and_mul_rejects_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="out"):
        silu_and_mul(torch.randn(2, 8, device=DEVICE), out=torch.empty(2, 8, device=DEVICE))
