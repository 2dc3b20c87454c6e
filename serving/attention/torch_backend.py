"""Reference attention backend in plain torch: gathers each request's K/V through req_to_token and runs SDPA."""

from __future__ import annotations

import torch

from serving.attention.base import AttentionBackend
from serving.forward_batch import ForwardBatch


def grouped_attention(q, k, v, mask, scale, compute_dtype=torch.float32):
    """q [B, Hq, Q, D], k/v [B, Hkv, K, D], mask [B, Q, K] bool -> [B, Hq, Q, D], computed in compute_dtype.

    Query heads sharing a KV head are stacked into the query dimension: one matmul per KV head, no K/V copies
    (much faster on CPU than SDPA's GQA path with a boolean mask)."""
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.reshape(b, hkv, g * nq, d).to(compute_dtype)
    scores = torch.matmul(qg, k.to(compute_dtype).transpose(-1, -2)) * scale  # [B, Hkv, G*Q, K]
    scores = scores.view(b, hkv, g, nq, -1).masked_fill(~mask[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(b, hkv, g * nq, -1)
    return torch.matmul(probs, v.to(compute_dtype)).view(b, hq, nq, d).to(q.dtype)


class TorchAttentionBackend(AttentionBackend):
    # fp32; float64 gives a second reference that differs from the first only far below bf16 precision, which
    # measures how far rounding noise alone moves greedy outputs (benchmarks/bench_gpu.py).
    compute_dtype = torch.float32

    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        md = fb.attn_metadata
        max_len = fb.max_seq_len
        slots = self.req_to_token[fb.req_pool_indices, :max_len].long()  # [B, L]
        md["slots"] = slots
        md["valid"] = torch.arange(max_len, device=slots.device)[None, :] < fb.seq_lens[:, None]  # [B, L]
        if not fb.mode.is_decode:
            masks = []
            for b in range(fb.batch_size):
                prefix, ext = fb.extend_prefix_lens_cpu[b], fb.extend_seq_lens_cpu[b]
                total = prefix + ext
                if fb.custom_mask is not None:
                    tree = fb.custom_mask[b, :ext, :ext]
                    mask = torch.cat([torch.ones(ext, prefix, dtype=torch.bool, device=tree.device), tree], dim=1)
                else:
                    mask = torch.ones(ext, total, dtype=torch.bool, device=slots.device).tril(prefix)
                masks.append(mask)  # [E, prefix+E]
            md["masks"] = masks

    def store_kv(self, k, v, layer_id, fb):
        self.k_cache[layer_id, fb.out_cache_loc] = k
        self.v_cache[layer_id, fb.out_cache_loc] = v

    def forward_decode(self, q, k, v, layer_id, fb):
        md = fb.attn_metadata
        keys = self.k_cache[layer_id, md["slots"]]  # [B, L, Hkv, D]
        vals = self.v_cache[layer_id, md["slots"]]
        out = grouped_attention(
            q.unsqueeze(2),  # [B, Hq, 1, D]
            keys.transpose(1, 2),  # [B, Hkv, L, D]
            vals.transpose(1, 2),
            md["valid"][:, None, :],
            self.scale,
            self.compute_dtype,
        )
        return out.squeeze(2)

    def forward_extend(self, q, k, v, layer_id, fb):
        md = fb.attn_metadata
        out = torch.empty_like(q)
        start = 0
        for b in range(fb.batch_size):
            ext = fb.extend_seq_lens_cpu[b]
            total = fb.extend_prefix_lens_cpu[b] + ext
            idx = md["slots"][b, :total]
            keys = self.k_cache[layer_id, idx].transpose(0, 1)  # [Hkv, T, D]
            vals = self.v_cache[layer_id, idx].transpose(0, 1)
            qb = q[start : start + ext].transpose(0, 1)  # [Hq, E, D]
            o = grouped_attention(
                qb.unsqueeze(0), keys.unsqueeze(0), vals.unsqueeze(0), md["masks"][b][None], self.scale,
                self.compute_dtype,
            )  # fmt: skip
            out[start : start + ext] = o[0].transpose(0, 1)
            start += ext
        return out
