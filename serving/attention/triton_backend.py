"""Triton attention backend (default on CUDA): paged decode with split-KV, extend/verify with a tree mask.
Nothing here reads device values on the host, so decode and verify can be captured in CUDA graphs."""

from __future__ import annotations

from kernels import decode_attention, extend_attention, store_kv
from serving.attention.base import AttentionBackend


class TritonAttentionBackend(AttentionBackend):
    """Split counts are chosen by the kernels from host ints only (shapes, SM count, req_to_token width)."""

    graph_capturable = True

    def __init__(self, k_cache, v_cache, req_to_token, scale, precise_pv: bool = False):
        super().__init__(k_cache, v_cache, req_to_token, scale)
        self.precise_pv = precise_pv

    def store_kv(self, k, v, layer_id, fb):
        store_kv(self.k_cache[layer_id], self.v_cache[layer_id], fb.out_cache_loc, k, v)

    def forward_decode(self, q, k, v, layer_id, fb):
        return decode_attention(
            q,
            self.k_cache[layer_id],
            self.v_cache[layer_id],
            self.req_to_token,
            fb.req_pool_indices,
            fb.seq_lens,
            self.scale,
            precise_pv=self.precise_pv,
        )

    def forward_extend(self, q, k, v, layer_id, fb):
        return extend_attention(
            q,
            k,
            v,
            self.k_cache[layer_id],
            self.v_cache[layer_id],
            self.req_to_token,
            fb.req_pool_indices,
            fb.extend_prefix_lens,
            fb.extend_seq_lens,
            fb.extend_start_loc,
            fb.max_extend_len,
            self.scale,
            custom_mask=fb.custom_mask,
            max_prefix_len_hint=fb.max_seq_len or None,
            precise_pv=self.precise_pv,
        )
