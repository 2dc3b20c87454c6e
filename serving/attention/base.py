"""Attention-backend interface: metadata once per forward, then one call per layer that stores K/V and attends."""

from __future__ import annotations

import torch

from serving.forward_batch import ForwardBatch


class AttentionBackend:
    # True when forward reads no host-side metadata, so a CUDA graph can capture it with fixed-size buffers.
    graph_capturable = False

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor, req_to_token: torch.Tensor, scale: float):
        self.k_cache = k_cache  # [L, S, Hkv, D]
        self.v_cache = v_cache
        self.req_to_token = req_to_token  # [R, C] int32
        self.scale = scale

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        pass

    def forward(self, q, k, v, layer_id: int, fb: ForwardBatch, kv_stored: bool = False) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]; k/v are stored at fb.out_cache_loc first, unless the caller
        already did (kv_stored: the fused RoPE kernel writes them)."""
        if not kv_stored:
            self.store_kv(k, v, layer_id, fb)
        if fb.mode.is_decode:
            return self.forward_decode(q, k, v, layer_id, fb)
        return self.forward_extend(q, k, v, layer_id, fb)

    def store_kv(self, k, v, layer_id: int, fb: ForwardBatch) -> None:
        raise NotImplementedError

    def forward_decode(self, q, k, v, layer_id, fb):
        raise NotImplementedError

    def forward_extend(self, q, k, v, layer_id, fb):
        raise NotImplementedError


def create_backend(name: str, k_cache, v_cache, req_to_token, scale, precise_pv: bool = False) -> AttentionBackend:
    """precise_pv: the Triton kernels' P.V precision (`kernels.decode_attention`); the torch backend computes in
    fp32 whatever it is."""
    if name == "auto":
        name = "triton" if k_cache.is_cuda else "torch"
    if name == "torch":
        from serving.attention.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend(k_cache, v_cache, req_to_token, scale)
    if name == "triton":
        from serving.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend(k_cache, v_cache, req_to_token, scale, precise_pv=precise_pv)
    raise ValueError(f"unknown attention backend {name!r} (auto, torch, triton)")
