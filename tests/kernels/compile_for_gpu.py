"""Compile every kernel's GPU path (INTERPRET=False branches, bf16 dot operands) for sm_90 without a GPU.

Run as `python -m tests.kernels.compile_for_gpu` with TRITON_INTERPRET unset (under the interpreter @triton.jit
gives functions that cannot be compiled). Prints one line per kernel variant, OK or FAIL, and exits 1 on any
failure. The block sizes mirror what the wrappers pick on CUDA tensors.
"""

from __future__ import annotations

import importlib
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# import_module: `kernels` re-exports functions under the module names decode_attention / extend_attention.
activation, decode_attention, extend_attention, kv_store, norm, rope, speculative = (
    importlib.import_module(f"kernels.{name}")
    for name in ("activation", "decode_attention", "extend_attention", "kv_store", "norm", "rope", "speculative")
)

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED_BYTES = 232448  # per block on sm_90 (227 KiB): more fails at launch with "out of resources"


def compile_variant(fn, types: dict[str, str], consts: dict, num_warps: int = 4, num_stages: int = 3) -> bool:
    """Compile with the 16-byte divisibility that a launch infers for torch allocations and for strides that are
    multiples of 16 (as at the Llama shapes), so that loads are vectorised and pipelined as on the GPU, and the
    shared memory reported is what a launch would need."""
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        elif name.startswith("stride"):
            signature[name] = "i32"
        else:
            raise KeyError(f"{fn.__name__}: no type for argument {name}")
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(fn.arg_names)
        if signature[name].startswith("*") or (name.startswith("stride") and not name.startswith("stride_l"))
    }
    try:
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=aligned),
            target=TARGET,
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    except Exception as e:  # report every failing variant, not only the first
        print(f"FAIL {fn.__name__} {consts}: {e!r}"[:4000])
        return False
    shared = compiled.metadata.shared
    if shared > MAX_SHARED_BYTES:
        print(f"FAIL {fn.__name__} {consts}: needs {shared} bytes of shared memory")
        return False
    print(f"OK   {fn.__name__} {consts} shared={shared}")
    return True


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for the GPU")
        return 2
    ok = True
    bf = "*bf16"
    da = decode_attention
    variants = [  # head dim, K/V type, precise P.V, merge, pipeline stages, group, splits
        (64, "*bf16", True, da.MERGE_LAST_SPLIT, 3, 4, 8),
        (128, "*bf16", True, da.MERGE_NONE, 2, 4, 1),
        (128, "*bf16", False, da.MERGE_NONE, 2, 4, 1),
        (128, "*bf16", True, da.MERGE_KERNEL, 3, 4, 8),
        (128, "*bf16", True, da.MERGE_LAST_SPLIT, 3, 4, 8),
        (128, "*bf16", False, da.MERGE_LAST_SPLIT, 2, 4, 8),
        (128, "*bf16", True, da.MERGE_LAST_SPLIT, 2, 8, 64),  # merged two heads at a time
        (128, "*bf16", True, da.MERGE_LAST_SPLIT, 2, 16, 8),
        (64, "*bf16", True, da.MERGE_NONE, 2, 3, 1),
        (128, "*fp32", False, da.MERGE_LAST_SPLIT, 3, 4, 8),
        (128, "*fp16", True, da.MERGE_LAST_SPLIT, 3, 4, 8),
    ]
    for head_dim, bf, precise, merge, stages, group, splits in variants:
        ok &= compile_variant(
            da._decode_attention_stage1_kernel,
            dict(
                q_ptr=bf, k_buffer_ptr=bf, v_buffer_ptr=bf, req_to_token_ptr="*i32", req_pool_indices_ptr="*i64",
                seq_lens_ptr="*i32", partial_out_ptr="*fp32", partial_lse_ptr="*fp32", out_ptr=bf, counter_ptr="*i32",
                qk_scale="fp32", num_kv_heads="i32",
            ),
            dict(GROUP=group, BLOCK_H=max(16, group), MERGE_HEADS=da.merge_heads(group, splits, head_dim),
                 BLOCK_S=splits, MERGE=merge.value, BLOCK_N=da.decode_block_n(head_dim, 4 if bf == "*fp32" else 2),
                 HEAD_DIM=head_dim, BLOCK_D=head_dim, NUM_SPLITS=splits, INTERPRET=False, PRECISE_PV=precise),
            num_warps=da.NUM_WARPS_GPU,
            num_stages=stages,
        )  # fmt: skip
    ok &= compile_variant(
        decode_attention._decode_attention_stage2_kernel,
        dict(partial_out_ptr="*fp32", partial_lse_ptr="*fp32", out_ptr=bf),
        dict(NUM_SPLITS=8, BLOCK_S=8, HEAD_DIM=128, BLOCK_D=128),
    )
    ea = extend_attention
    variants = [
        (4, 32, True, "*bf16", ea.PREFIX_SPLIT, True),
        (4, 32, True, "*bf16", ea.MERGE_EXTEND, True),
        (4, 32, True, "*bf16", ea.FULL, True),
        (4, 32, True, "*bf16", ea.FULL, False),
        (1, 64, False, "*bf16", ea.FULL, True),
        (4, 32, True, "*fp32", ea.PREFIX_SPLIT, False),
        (4, 32, True, "*fp32", ea.FULL, False),
    ]
    for group, block_m, mask, bf, phase, precise in variants:
        ok &= compile_variant(
            ea._extend_attention_kernel,
            dict(
                q_ptr=bf, k_ptr=bf, v_ptr=bf, out_ptr=bf, k_buffer_ptr=bf, v_buffer_ptr=bf, req_to_token_ptr="*i32",
                req_pool_indices_ptr="*i64", prefix_lens_ptr="*i32", extend_lens_ptr="*i32",
                extend_start_loc_ptr="*i32", custom_mask_ptr="*u8" if mask else bf, partial_out_ptr="*fp32",
                partial_lse_ptr="*fp32", qk_scale="fp32", num_m_blocks="i32",
            ),
            dict(
                GROUP=group, BLOCK_G=group, BLOCK_M=block_m, BLOCK_N=64, HEAD_DIM=128, BLOCK_D=128,
                USE_CUSTOM_MASK=mask, NUM_SPLITS=4, PHASE=phase.value, INTERPRET=False,
                PRECISE_PV=precise,
            ),
            num_warps=8 if group * block_m >= 128 else 4,
            num_stages=ea.NUM_STAGES_GPU,
        )  # fmt: skip
    bf = "*bf16"
    ok &= compile_variant(
        kv_store._store_kv_kernel,
        dict(k_buffer_ptr=bf, v_buffer_ptr=bf, loc_ptr="*i64", k_ptr=bf, v_ptr=bf),
        dict(NUM_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128),
    )
    ok &= compile_variant(
        norm._rms_norm_kernel,
        dict(x_ptr=bf, residual_ptr=bf, weight_ptr=bf, out_ptr=bf, eps="fp32"),
        dict(HIDDEN=4096, BLOCK=4096, ADD_RESIDUAL=True),
        num_warps=16,
    )
    ok &= compile_variant(
        rope._apply_rope_kernel,
        dict(
            q_ptr=bf, k_ptr=bf, positions_ptr="*i64", cos_sin_ptr="*fp32", v_ptr=bf, k_buffer_ptr=bf, v_buffer_ptr=bf,
            loc_ptr="*i64",
        ),
        dict(
            NUM_Q_HEADS=32, NUM_K_HEADS=8, HALF=64, BLOCK_QH=32, BLOCK_KH=8, BLOCK_HALF=64, HEAD_DIM=128, BLOCK_D=128,
            STORE_KV=True,
        ),
    )  # fmt: skip
    ok &= compile_variant(activation._silu_and_mul_kernel, dict(x_ptr=bf, out_ptr=bf), dict(INTER=14336, BLOCK=1024))
    tree_ptrs = dict(
        candidates_ptr="*i64", retrive_index_ptr="*i64", retrive_next_token_ptr="*i64",
        retrive_next_sibling_ptr="*i64", predicts_ptr="*i32", accept_index_ptr="*i32", accept_length_ptr="*i32",
    )  # fmt: skip
    ok &= compile_variant(
        speculative._build_tree_kernel,
        dict(
            parent_list_ptr="*i64", selected_index_ptr="*i64", seq_lens_ptr="*i64", tree_mask_ptr="*i8",
            positions_ptr="*i64", retrive_index_ptr="*i64", retrive_next_token_ptr="*i64",
            retrive_next_sibling_ptr="*i64",
        ),
        dict(NUM_PARENTS=25, TOPK=8, DEPTH=4, N=64, BLOCK_N=64),
    )  # fmt: skip
    ok &= compile_variant(
        speculative._verify_tree_greedy_kernel,
        dict(tree_ptrs, target_predict_ptr="*i64"),
        dict(N=64, NUM_SPEC=6, BLOCK_N=64, BLOCK_S=8),
    )
    ok &= compile_variant(
        speculative._tree_speculative_sampling_kernel,
        dict(
            tree_ptrs, uniform_samples_ptr="*fp32", uniform_final_ptr="*fp32", target_probs_ptr="*fp32",
            draft_probs_ptr="*fp32", threshold_single="fp32", threshold_acc="fp32",
        ),
        dict(N=64, NUM_SPEC=6, VOCAB=128256, HAS_DRAFT_PROBS=False, BLOCK_N=64, BLOCK_S=8, BLOCK_V=1024),
    )  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
