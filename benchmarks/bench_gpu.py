"""GPU engine benchmark: copy bandwidth, SmolLM2 non-speculative decode, GPU-vs-reference greedy agreement,
Llama-3.1-8B-shaped step costs and the transformers baseline, in one run. Prints a table, writes JSON.

    python benchmarks/bench_gpu.py --out gpu.json [--skip-hf] [--num-prompts 20] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from types import SimpleNamespace

import torch


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of do_bench)."""
    import triton

    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * n / (ms * 1e-3)


def _prompts(engine, n):
    from serving.bench import load_prompts

    return load_prompts("mtbench", n, engine.tokenizer)


def smollm2_decode(n_prompts: int, max_tokens: int) -> dict:
    """Batch 1, greedy, one request after another; output tokens / wall time (Python overhead included), with the
    default continuous decode steps (8 on CUDA) and with one step per scheduling round. One untimed pass over the
    same prompts first: a fresh process's first pass also compiles kernels for new shapes, and in session 7 it ran
    at 894 tokens/s against 1,053-1,174 for the next three (`benchmarks/plain_mode_cost.py`)."""
    from serving.config import EngineConfig
    from serving.engine import Engine
    from serving.sampling import SamplingParams

    engine = Engine(
        EngineConfig(max_running_requests=1, dtype="bfloat16", max_total_tokens=65536, num_continuous_decode_steps=8)
    )
    prompts = _prompts(engine, n_prompts)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_tokens=32, temperature=0))

    def timed():
        engine.flush_cache()  # every pass prefills its prompts in full: no prefix-cache hits from earlier passes
        torch.cuda.synchronize()
        start = time.perf_counter()
        reqs = engine.generate(prompts, params)
        torch.cuda.synchronize()
        return reqs, time.perf_counter() - start

    timed()
    reqs, elapsed = timed()
    tokens = sum(len(r.output_ids) for r in reqs)
    graph_ms = _graph_step_ms(engine)
    engine.cfg.num_continuous_decode_steps = 1
    single, single_s = timed()
    engine.cfg.num_continuous_decode_steps = 16
    long_runs, long_s = timed()
    out = {
        "prompts": len(prompts),
        "output_tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens / elapsed,
        "continuous_decode_steps": 8,
        "tokens_per_s_one_step_per_round": sum(len(r.output_ids) for r in single) / single_s,
        "same_output_one_step_per_round": [r.output_ids for r in single] == [r.output_ids for r in reqs],
        "tokens_per_s_16_steps_per_round": sum(len(r.output_ids) for r in long_runs) / long_s,
        "graph_replay_ms_bs1": graph_ms,
        "fused_gemv": engine.runner.model.fused_gemv,
    }
    del engine
    torch.cuda.empty_cache()
    # The same with every linear through cuBLAS (the few-row fused kernels off).
    engine = Engine(
        EngineConfig(max_running_requests=1, dtype="bfloat16", max_total_tokens=65536, num_continuous_decode_steps=8,
                     disable_fused_gemv=True)
    )  # fmt: skip
    engine.generate(prompts[:2], SamplingParams(max_tokens=32, temperature=0))
    cublas, cublas_s = timed()
    out["tokens_per_s_cublas_linears"] = sum(len(r.output_ids) for r in cublas) / cublas_s
    out["graph_replay_ms_bs1_cublas_linears"] = _graph_step_ms(engine)
    return out


def _graph_step_ms(engine) -> float | None:
    gr = engine.runner.graph_runner
    return None if gr is None else time_ms(gr.graphs[1].replay, reps=50, warmup=5)


def greedy_agreement(n_prompts: int, tokens: int) -> dict:
    """The GPU path (Triton attention + CUDA graphs + fused kernels) against the torch reference attention backend
    (`--attention-backend torch --disable-cuda-graph`) and against the pure torch path (no Triton kernel at all),
    same dtype, same prompts, greedy. In bf16 it also separates the causes: which pairs of these runs disagree."""
    from serving.config import EngineConfig
    from serving.engine import Engine
    from serving.sampling import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    runs = {
        "gpu_path": ({}, True),
        "gpu_path_eager": ({"disable_cuda_graph": True}, True),
        "gpu_path_precise_pv": ({"attention_precise_pv": True}, True),
        "torch_backend": ({"attention_backend": "torch", "disable_cuda_graph": True}, True),
        "pure_torch": ({"attention_backend": "torch", "disable_cuda_graph": True}, False),
        # pure torch again with attention in fp64: differs from pure_torch only far below bf16 precision
        "pure_torch_fp64_attention": ({"attention_backend": "torch", "disable_cuda_graph": True}, False),
    }
    out = {"prompts": n_prompts, "tokens": tokens}
    prompts = None
    for dtype in ("float32", "bfloat16"):
        outputs = {}
        for name, (flags, fused) in runs.items():
            if dtype == "float32" and name in ("gpu_path_eager", "gpu_path_precise_pv", "pure_torch_fp64_attention"):
                continue
            engine = Engine(EngineConfig(dtype=dtype, max_running_requests=8, max_total_tokens=65536, **flags))
            engine.runner.model.fused_kernels = fused
            if name == "pure_torch_fp64_attention":
                engine.runner.backend.compute_dtype = torch.float64
            prompts = prompts or _prompts(engine, n_prompts)
            outputs[name] = [r.output_ids for r in engine.generate(prompts, params)]
            del engine
            torch.cuda.empty_cache()

        key = "fp32" if dtype == "float32" else "bf16"
        out[key] = {
            "gpu_path_vs_torch_backend": _compare(outputs["gpu_path"], outputs["torch_backend"]),
            "gpu_path_vs_pure_torch": _compare(outputs["gpu_path"], outputs["pure_torch"]),
        }
        if dtype == "bfloat16":
            pairs = {
                "cuda_graphs_only (gpu_path vs gpu_path_eager)": ("gpu_path", "gpu_path_eager"),
                "attention_only (gpu_path_eager vs torch_backend)": ("gpu_path_eager", "torch_backend"),
                "precise_pv (gpu_path with --attention-precise-pv vs torch_backend)": (
                    "gpu_path_precise_pv", "torch_backend"),
                "pv_precision_only (gpu_path vs gpu_path with --attention-precise-pv)": (
                    "gpu_path", "gpu_path_precise_pv"),
                "fused_kernels_only (torch_backend vs pure_torch)": ("torch_backend", "pure_torch"),
                "rounding_noise_floor (pure_torch vs pure_torch_fp64_attention)": (
                    "pure_torch", "pure_torch_fp64_attention"),
            }  # fmt: skip
            for label, (a, b) in pairs.items():
                out[key][label] = _compare(outputs[a], outputs[b])
    out["fp32_identical"] = out["fp32"]["gpu_path_vs_torch_backend"]["identical"]
    out["bf16_identical"] = out["bf16"]["gpu_path_vs_torch_backend"]["identical"]
    out["bf16_identical_vs_pure_torch"] = out["bf16"]["gpu_path_vs_pure_torch"]["identical"]
    return out


def _compare(xs: list[list[int]], ys: list[list[int]]) -> dict:
    first = [next((i for i, (u, w) in enumerate(zip(x, y)) if u != w), None) for x, y in zip(xs, ys) if x != y]
    return {"identical": sum(x == y for x, y in zip(xs, ys)), "first_difference_at": first}


def llama8b_setup(prompt_len: int = 512) -> dict:
    """Random weights in Llama-3.1-8B's shape (bf16) behind an engine with one request's prefix of prompt_len:
    callables for the decode graph replay (batch 1), the 64-token tree forward eager, and the same forward through
    the verify CUDA graph (aux states and logits included, as the speculative engine runs it)."""
    from serving.config import EngineConfig
    from serving.cuda_graph_runner import VerifyGraphRunner
    from serving.engine import Engine
    from serving.forward_batch import ForwardMode
    from serving.models.llama import LlamaForCausalLM, TargetConfig
    from serving.models.loader import LoadedTarget
    from serving.request import Req
    from serving.sampling import SamplingParams

    cfg = TargetConfig("llama", 4096, 32, 32, 8, 128, 14336, 128256, 1e-5, 500000.0, None, 8192, False, False, False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    model.rotary = type(model.rotary)(128, 8192, 500000.0).cuda()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tok = SimpleNamespace(eos_token_id=None, decode=lambda ids, skip_special_tokens=True: "")
    target = LoadedTarget(model, tok, SimpleNamespace(eos_token_id=None), "llama8b-random", "llama8b-random", "x")
    engine = Engine(EngineConfig(max_running_requests=1, max_total_tokens=16384, cuda_graph_max_bs=1), target)
    prompt = torch.randint(0, 128000, (prompt_len,)).tolist()
    engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    runner = engine.runner
    tree_req = Req("tree", prompt, SamplingParams())
    tree_req.row = runner.req_to_token.alloc()
    tree_req.slots = engine.allocator.alloc(prompt_len)  # prefix KV content does not change the cost
    runner.req_to_token.write(tree_req.row, 0, tree_req.slots)
    n = 64
    slots = engine.allocator.alloc(n)
    parent = torch.randint(0, 1, (n,))
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        parent[i] = torch.randint(0, i, (1,))
        mask[i] |= mask[parent[i]]
    mask[:, 0] = True
    fb = runner.build_extend([tree_req], [slots], mode=ForwardMode.TARGET_VERIFY, tokens=[list(range(n))])
    fb.custom_mask = mask[None].cuda()
    runner.aux_layer_ids = (1, 15, 28)
    verify = VerifyGraphRunner(runner, n, max_bs=1)
    rows = torch.tensor([tree_req.row], device="cuda")
    prefix = torch.tensor([prompt_len], device="cuda")
    ids, pos = torch.arange(n, device="cuda"), torch.full((n,), prompt_len, device="cuda")
    loc = slots.cuda()
    return {
        "engine": engine,
        "weight_bytes": weight_bytes,
        "prefix": prompt_len,
        "decode": runner.graph_runner.graphs[1].replay,
        "tree_eager": lambda: model.compute_logits(runner.forward(fb)[0]),
        "tree_graph": lambda: verify.run(rows, prefix, ids, pos, loc, fb.custom_mask),
    }


def time_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Milliseconds per call of fn (CUDA events around reps back-to-back calls, after warmup calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def llama8b_step_costs(copy_bw: float, prompt_len: int = 512) -> dict:
    """Decode step at batch 1 against one read of the weights, and a 64-token tree forward against one decode step
    (random weights in Llama-3.1-8B's shape, bf16)."""
    s = llama8b_setup(prompt_len)
    decode_ms = time_ms(s["decode"], 50)
    eager_ms = time_ms(s["tree_eager"])
    tree_ms = time_ms(s["tree_graph"])
    floor_ms = s["weight_bytes"] / copy_bw * 1e3
    return {
        "weight_bytes": s["weight_bytes"],
        "weights_read_ms": floor_ms,
        "decode_step_ms": decode_ms,
        "decode_over_floor": decode_ms / floor_ms,
        "tree64_forward_ms": tree_ms,
        "tree64_over_decode": tree_ms / decode_ms,
        "tree64_forward_eager_ms": eager_ms,
        "tree64_note": "tree64_forward_ms: verify CUDA graph incl. aux states and logits; eager: no graph",
        "prefix": prompt_len,
    }


def hf_baseline(n_prompts: int, max_tokens: int) -> dict:
    from transformers import AutoTokenizer

    from serving.bench import hf_generate_baseline, load_prompts
    from serving.models.loader import resolve_model_path

    folder, _ = resolve_model_path(None)
    prompts = load_prompts("mtbench", n_prompts, AutoTokenizer.from_pretrained(str(folder)))
    return hf_generate_baseline(None, prompts, max_tokens, torch.device("cuda"), "bfloat16")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--hf-prompts", type=int, default=3)
    p.add_argument("--skip", default="", help="comma list of sections to skip: decode,agree,llama8b,hf")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    skip = set(args.skip.split(","))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    res["copy_bandwidth_Bps"] = bw = copy_bandwidth()
    sections = [
        ("decode", lambda: smollm2_decode(args.num_prompts, args.max_tokens)),
        ("agree", lambda: greedy_agreement(args.num_prompts, 32)),
        ("llama8b", lambda: llama8b_step_costs(bw)),
        ("hf", lambda: hf_baseline(args.hf_prompts, args.max_tokens)),
    ]
    for name, fn in sections:
        if name in skip:
            continue
        try:
            res[name] = fn()
        except Exception as e:  # keep the other sections' numbers
            import traceback

            traceback.print_exc()
            res[name] = {"error": repr(e)}
        torch.cuda.empty_cache()
        if args.out:
            open(args.out, "w").write(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"\ncopy bandwidth: {bw / 1e12:.2f} TB/s")
    d = res.get("decode", {})
    if "tokens_per_s" in d:
        print(
            f"SmolLM2 bf16 batch 1 greedy: {d['tokens_per_s']:.1f} tok/s ({d['output_tokens']} tokens), "
            f"{d['tokens_per_s_one_step_per_round']:.1f} tok/s with one step per round, "
            f"graph step {d['graph_replay_ms_bs1']:.3f} ms"
        )
        if "tokens_per_s_cublas_linears" in d:
            print(
                f"  16 steps per round: {d['tokens_per_s_16_steps_per_round']:.1f} tok/s; cuBLAS linears (few-row "
                f"kernels off): {d['tokens_per_s_cublas_linears']:.1f} tok/s, graph step "
                f"{d['graph_replay_ms_bs1_cublas_linears']:.3f} ms"
            )
    a = res.get("agree", {})
    if "fp32_identical" in a:
        print(
            f"greedy vs torch attention backend: fp32 {a['fp32_identical']}/{a['prompts']}, "
            f"bf16 {a['bf16_identical']}/{a['prompts']} over {a['tokens']} tokens "
            f"(vs pure torch: bf16 {a['bf16_identical_vs_pure_torch']}/{a['prompts']})"
        )
        for name, c in a["bf16"].items():
            print(f"  bf16 {name}: {c['identical']}/{a['prompts']}, first differences at {c['first_difference_at']}")
    l8 = res.get("llama8b", {})
    if "decode_step_ms" in l8:
        print(
            f"Llama-8B shape: decode {l8['decode_step_ms']:.3f} ms = {l8['decode_over_floor']:.2f}x weight read; "
            f"tree64 {l8['tree64_forward_ms']:.3f} ms = {l8['tree64_over_decode']:.2f}x decode"
        )
    h = res.get("hf", {})
    if "output_tokens_per_s" in h:
        print(f"transformers generate bf16: {h['output_tokens_per_s']:.1f} tok/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
