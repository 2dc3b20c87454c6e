"""Argument checks and block-size helpers shared by the kernel wrappers (metadata only: no device sync)."""

from __future__ import annotations

import functools

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    t: torch.Tensor,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = False,
) -> None:
    """Raise ValueError naming `name` when `t` has the wrong type, rank, shape (None = any), dtype or device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, want in enumerate(shape):
            if want is not None and t.shape[i] != want:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected size {want} in dim {i} ({shape})")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {t.stride()}")


def check_out(name: str, out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """Validate a caller-provided output buffer (None is allowed)."""
    if out is None:
        return
    check_tensor(name, out, ndim=len(shape), dtypes=(dtype,), shape=shape, device=device, last_dim_contiguous=True)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a cached host query: no sync, fine during graph capture).

    For CPU tensors (the interpreter runs programs one after another) a nominal 4, so that split heuristics still
    give a few splits there."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def on_interpreter(t: torch.Tensor) -> bool:
    """True for CPU tensors, which only the Triton interpreter (TRITON_INTERPRET=1) runs.

    Kernels take it as the constexpr INTERPRET: the interpreter mis-handles bf16 dots and bf16 * scalar (so operands
    are upcast to fp32) and, under numpy >= 2, cannot use tensors as range() bounds (so loops become while loops).
    """
    return not t.is_cuda
