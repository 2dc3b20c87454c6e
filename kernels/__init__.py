"""Triton kernels (each with a pure-torch reference) for serving: attention over SGLang's paged KV layout, KV
stores, norms, RoPE, activations and the EAGLE tree ops. Imports nothing else from the project."""

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.decode_attention import decode_attention, decode_attention_ref
from kernels.extend_attention import extend_attention, extend_attention_ref
from kernels.gemv import MAX_ROWS as GEMV_MAX_ROWS
from kernels.gemv import fused_linear, fused_linear_ref
from kernels.kv_store import store_kv, store_kv_ref
from kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from kernels.rope import apply_rope, apply_rope_ref
from kernels.speculative import (
    build_tree,
    build_tree_ref,
    tree_speculative_sampling,
    tree_speculative_sampling_ref,
    verify_tree_greedy,
    verify_tree_greedy_ref,
)

__all__ = [
    "decode_attention",
    "decode_attention_ref",
    "extend_attention",
    "extend_attention_ref",
    "GEMV_MAX_ROWS",
    "fused_linear",
    "fused_linear_ref",
    "store_kv",
    "store_kv_ref",
    "build_tree",
    "build_tree_ref",
    "verify_tree_greedy",
    "verify_tree_greedy_ref",
    "tree_speculative_sampling",
    "tree_speculative_sampling_ref",
    "rms_norm",
    "rms_norm_ref",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "apply_rope",
    "apply_rope_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
]
