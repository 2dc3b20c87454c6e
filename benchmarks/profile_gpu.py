"""Where a decode step's time goes on the GPU: per-kernel time of the SmolLM2 batch-1 decode graph, the host's cost
of issuing one continuous decode step, and the kernels of the Llama-3.1-8B-shape decode and 64-token tree forward.

    python benchmarks/profile_gpu.py [--out profile.json] [--skip smollm2,speculative,llama8b]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

import torch
from bench_gpu import llama8b_setup, time_ms  # the script's folder is on sys.path
from torch.profiler import ProfilerActivity, profile


def kernel_table(fn, reps: int = 10, top: int = 25) -> dict:
    """fn run reps times under the profiler -> per-kernel {name: [launches per run, us per run]}, sorted by time."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    table = defaultdict(lambda: [0, 0.0])
    for evt in prof.events():
        if evt.device_type.name != "CUDA":
            continue
        name = evt.name[:70]
        table[name][0] += 1
        table[name][1] += evt.device_time
    rows = sorted(table.items(), key=lambda kv: -kv[1][1])
    total_launches = sum(v[0] for _, v in rows) / reps
    total_us = sum(v[1] for _, v in rows) / reps
    return {
        "launches_per_run": total_launches,
        "kernel_us_per_run": total_us,
        "kernels": {k: [v[0] / reps, round(v[1] / reps, 2)] for k, v in rows[:top]},
    }


def smollm2() -> dict:
    from serving.config import EngineConfig
    from serving.engine import Engine
    from serving.sampling import SamplingParams

    engine = Engine(EngineConfig(max_running_requests=1, dtype="bfloat16", max_total_tokens=65536))
    prompt = list(range(100, 400))
    engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0))
    gr = engine.runner.graph_runner
    graph = gr.graphs[1]
    out = {"graph_replay": kernel_table(graph.replay, reps=20)}
    out["graph_replay_ms"] = time_ms(graph.replay, reps=50, warmup=1)

    # Host cost of one continuous step (build inputs + replay + sample), issued back to back without syncs.
    req = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0]
    runner = engine.runner
    from serving.request import Req

    live = Req("p", prompt + req.output_ids, SamplingParams(max_tokens=1000, temperature=0))
    live.row = runner.req_to_token.alloc()
    live.slots = engine.allocator.alloc(len(live.all_ids) - 1)
    runner.req_to_token.write(live.row, 0, live.slots)
    slots = engine.allocator.alloc(64).view(1, 64)
    torch.cuda.synchronize()
    steps = 64
    t0 = time.perf_counter()
    toks = engine._continuous_decode([live], slots, [live.params], [0])
    t_issue = time.perf_counter() - t0
    toks.tolist()
    t_total = time.perf_counter() - t0
    out["continuous_64_steps"] = {
        "host_issue_ms_per_step": t_issue / steps * 1e3,
        "wall_ms_per_step": t_total / steps * 1e3,
    }
    # One whole generation at batch 1 (256 tokens): wall per token, prefill included.
    engine.flush_cache()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = engine.generate([prompt], SamplingParams(max_tokens=256, temperature=0, ignore_eos=True))[0]
    dt = time.perf_counter() - t0
    out["generate_256"] = {"ms_per_token": dt / len(r.output_ids) * 1e3, "tokens_per_s": len(r.output_ids) / dt}
    # Prefill of the 300-token prompt (eager), alone.
    engine.flush_cache()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))
    torch.cuda.synchronize()
    out["prefill_300_ms"] = (time.perf_counter() - t0) * 1e3
    return out


def speculative() -> dict:
    """Chain 3/1/4 with the bundled draft at batch 1, speculating every step: wall time per verify iteration against
    the GPU's kernel time in it (the rest is host time the GPU waits through), and the kernels' split."""
    from serving.config import EngineConfig
    from serving.engine import Engine
    from serving.sampling import SamplingParams

    engine = Engine(
        EngineConfig(
            max_running_requests=4, dtype="bfloat16", max_total_tokens=65536, speculative=True,
            disable_speculative_adaptive=True, speculative_num_steps=3, speculative_eagle_topk=1,
            speculative_num_draft_tokens=4,
        )
    )  # fmt: skip
    text = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Explain how a hash map works, with an example in Python."}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    prompt = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    engine.generate([prompt], params)
    engine.flush_cache()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        req = engine.generate([prompt], params)[0]
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    kernel_us = sum(e.device_time for e in prof.events() if e.device_type.name == "CUDA")
    steps = max(1, req.spec.num_verify_steps)
    table = defaultdict(float)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            table[e.name[:60]] += e.device_time / steps
    return {
        "accept_length": req.spec.accept_length,
        "verify_steps": steps,
        "wall_ms_per_iteration": wall / steps * 1e3,
        "gpu_kernel_ms_per_iteration": kernel_us / steps / 1e3,
        "top_kernels_us_per_iteration": dict(sorted(table.items(), key=lambda kv: -kv[1])[:20]),
    }


def llama8b() -> dict:
    s = llama8b_setup()
    out = {"decode_graph": kernel_table(s["decode"], reps=5, top=15)}
    out["tree64_eager"] = kernel_table(s["tree_eager"], reps=5, top=15)
    out["tree64_graph"] = kernel_table(s["tree_graph"], reps=5, top=15)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--skip", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    res = {}
    for name, fn in (("smollm2", smollm2), ("speculative", speculative), ("llama8b", llama8b)):
        if name in args.skip.split(","):
            continue
        try:
            res[name] = fn()
        except Exception as e:
            import traceback

            traceback.print_exc()
            res[name] = {"error": repr(e)}
        torch.cuda.empty_cache()
    text = json.dumps(res, indent=1)
    if args.out:
        open(args.out, "w").write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
