"""The one typed per-step batch object passed explicitly through model, attention backend and sampler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch


class ForwardMode(enum.Enum):
    EXTEND = enum.auto()  # prefill / chunked prefill: new tokens after a cached prefix, causal
    DECODE = enum.auto()  # one new token per request
    TARGET_VERIFY = enum.auto()  # a draft tree per request, under the tree mask
    DRAFT_EXTEND = enum.auto()  # the draft consumes accepted tokens with the target's hidden states

    @property
    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE


@dataclass
class ForwardBatch:
    mode: ForwardMode
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    out_cache_loc: torch.Tensor  # [N] KV slot of each new token
    req_pool_indices: torch.Tensor  # [B] rows of req_to_token
    seq_lens: torch.Tensor  # [B] total length after this forward
    # EXTEND / TARGET_VERIFY / DRAFT_EXTEND
    extend_prefix_lens: torch.Tensor | None = None  # [B]
    extend_seq_lens: torch.Tensor | None = None  # [B]
    extend_start_loc: torch.Tensor | None = None  # [B] row offset of each request in the flattened tokens
    extend_seq_lens_cpu: list[int] | None = None
    extend_prefix_lens_cpu: list[int] | None = None
    max_extend_len: int = 1
    custom_mask: torch.Tensor | None = None  # [B, E, E] bool, TARGET_VERIFY only
    seq_lens_cpu: list[int] | None = None
    max_seq_len: int = 0
    aux_layer_ids: tuple[int, ...] = ()  # capture these target layers' outputs (EAGLE-3)
    attn_backend: object = None
    attn_metadata: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.req_pool_indices.shape[0]
