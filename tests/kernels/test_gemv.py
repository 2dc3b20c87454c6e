import pytest
import torch

from kernels.gemv import MAX_ROWS, fused_linear, fused_linear_ref, fused_linear_supported
from tests.kernels.paged import DEVICE

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# fp32 sums in another order than torch's matmul; the result (and each intermediate the unfused ops store) is
# rounded to the dtype, so a low-precision dtype may differ by an ulp or two after a rounding boundary.
TOL = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.float16: {"atol": 4e-3, "rtol": 4e-3},
    torch.bfloat16: {"atol": 3e-2, "rtol": 3e-2},
}
VARIANTS = {
    "plain": {},
    "bias": {"bias": True},
    "norm": {"norm": True},
    "norm_silu_mul": {"norm": True, "silu_mul": True},
    "residual": {"residual": True},
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _case(m, n, k, dtype, bias=False, norm=False, silu_mul=False, residual=False):
    rows = 2 * n if silu_mul else n
    x = (2 * torch.randn(m, k, generator=_gen())).to(dtype).to(DEVICE)
    w = (torch.randn(rows, k, generator=_gen(1)) / k**0.5).to(dtype).to(DEVICE)
    kw = {}
    if bias:
        kw["bias"] = (0.1 * torch.randn(rows, generator=_gen(2))).to(dtype).to(DEVICE)
    if norm:
        kw["norm_weight"] = (1 + 0.1 * torch.randn(k, generator=_gen(3))).to(dtype).to(DEVICE)
        kw["eps"] = 1e-5
    if silu_mul:
        kw["silu_mul"] = True
    if residual:
        kw["residual"] = torch.randn(m, n, generator=_gen(4)).to(dtype).to(DEVICE)
    return x, w, kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("m,n,k", [(1, 64, 96), (3, 130, 576), (8, 40, 2100)])
def test_fused_linear_matches_reference(dtype, variant, m, n, k):
    x, w, kw = _case(m, n, k, dtype, **VARIANTS[variant])
    want = fused_linear_ref(x, w, **kw)
    residual = kw.get("residual")
    res_ptr = residual.data_ptr() if residual is not None else None
    got = fused_linear(x, w, **kw)
    assert got.shape == (m, n) and got.dtype == dtype and got.device == DEVICE
    if residual is not None:
        assert got.data_ptr() == res_ptr  # added in place
    torch.testing.assert_close(got.cpu(), want.cpu(), **TOL[dtype])


def test_fused_linear_equals_separate_ops_on_a_decoder_layer_mlp():
    """norm -> gate_up -> silu*up -> down -> += residual, fused into two calls, against the unfused chain."""
    h, inter = 48, 80
    residual = torch.randn(2, h, generator=_gen(5)).to(DEVICE)
    norm_w = (1 + 0.1 * torch.randn(h, generator=_gen(6))).to(DEVICE)
    gate_up = (torch.randn(2 * inter, h, generator=_gen(7)) / h**0.5).to(DEVICE)
    down = (torch.randn(h, inter, generator=_gen(8)) / inter**0.5).to(DEVICE)
    want = residual + fused_linear_ref(fused_linear_ref(residual, gate_up, norm_weight=norm_w, silu_mul=True), down)
    act = fused_linear(residual, gate_up, norm_weight=norm_w, silu_mul=True)
    got = fused_linear(act, down, residual=residual.clone())
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-4, rtol=1e-4)


def test_fused_linear_writes_out_buffer():
    x, w, _ = _case(2, 33, 70, torch.float32)
    out = torch.empty(2, 33, device=DEVICE)
    assert fused_linear(x, w, out=out) is out
    torch.testing.assert_close(out.cpu(), fused_linear_ref(x, w).cpu(), atol=1e-4, rtol=1e-4)


def test_fused_linear_rejects_bad_arguments():
    x = torch.randn(2, 16, device=DEVICE)
    w = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="rows"):
        fused_linear(torch.randn(MAX_ROWS + 1, 16, device=DEVICE), w)
    with pytest.raises(ValueError, match="weight"):
        fused_linear(x, torch.randn(8, 15, device=DEVICE))
    with pytest.raises(ValueError, match="weight"):
        fused_linear(x, w.half())
    with pytest.raises(ValueError, match="odd"):
        fused_linear(x, torch.randn(7, 16, device=DEVICE), silu_mul=True)
    with pytest.raises(ValueError, match="norm_weight"):
        fused_linear(x, w, norm_weight=torch.ones(15, device=DEVICE))
    with pytest.raises(ValueError, match="residual"):
        fused_linear(x, w, residual=torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="residual must not be x"):
        sq = torch.randn(2, 8, device=DEVICE)
        fused_linear(sq, torch.randn(8, 8, device=DEVICE), residual=sq)
    with pytest.raises(ValueError, match="bias"):
        fused_linear(x, w, bias=torch.zeros(7, device=DEVICE))
    assert fused_linear_supported(x, w)
    assert not fused_linear_supported(torch.randn(MAX_ROWS + 1, 16, device=DEVICE), w)
    assert not fused_linear_supported(x.t().contiguous().t(), w)
