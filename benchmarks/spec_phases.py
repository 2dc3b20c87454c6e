"""Where a speculative iteration's time goes: forced speculation at batch 1 on MT-Bench prompts, first timed as is,
then with a device sync around each phase of `EagleWorker.decode_step` (draft catch-up and extend, tree growth and
building, target verify, greedy acceptance, commit), which gives each phase's wall time including its kernels. The
draft extend after a verify is `draft_extend_graph` where CUDA graphs run it, `_draft_extend` where it is eager.

    python benchmarks/spec_phases.py --config 3,1,4 [--config 6,8,32] [--draft DIR] [--out phases.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from serving.bench import load_prompts
from serving.config import EngineConfig
from serving.engine import Engine
from serving.sampling import SamplingParams

PHASES = ["_catch_up", "_grow_tree", "_build_tree", "_verify_greedy", "_draft_extend"]


def measure(config: str, draft: str | None, num_prompts: int, max_tokens: int, device: str | None) -> dict:
    steps, topk, ntok = (int(x) for x in config.split(","))
    cfg = EngineConfig(
        device=device or "auto", speculative=True, disable_speculative_adaptive=True, max_running_requests=1,
        max_total_tokens=8192, speculative_num_steps=steps, speculative_eagle_topk=topk,
        speculative_num_draft_tokens=ntok, speculative_draft_model_path=draft,
    )  # fmt: skip
    engine = Engine(cfg)
    dev = engine.device
    prompts = load_prompts("mtbench", 2 + 2 * num_prompts, engine.tokenizer)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    engine.generate(prompts[:2], params)  # compiles and captures outside the timed runs
    engine.spec_worker.capture_graphs(1, max(len(p) for p in prompts) + max_tokens + ntok)

    def run(batch):
        engine.cuda_sync()
        start = time.perf_counter()
        reqs = engine.generate(batch, params)
        engine.cuda_sync()
        iters = sum(r.spec.num_verify_steps for r in reqs)
        return time.perf_counter() - start, iters, sum(len(r.output_ids) for r in reqs)

    secs, iters, tokens = run(prompts[2 : 2 + num_prompts])
    worker, times = engine.spec_worker, {}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            engine.cuda_sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            engine.cuda_sync()
            times[name] = times.get(name, 0.0) + time.perf_counter() - t0
            return out

        return wrapper

    for name in PHASES:
        setattr(worker, name, timed(name, getattr(worker, name)))
    if worker.extend_graphs is not None:  # the draft extend after a verify, on fixed buffers (CUDA graphs)
        worker.extend_graphs.run = timed("draft_extend_graph", worker.extend_graphs.run)
    engine.runner.verify = timed("verify", engine.runner.verify)
    engine._commit = timed("_commit", engine._commit)
    worker.decode_step = timed("decode_step", worker.decode_step)
    synced_secs, synced_iters, _ = run(prompts[2 + num_prompts :])
    return {
        "config": config, "device": str(dev), "tokens": tokens, "iterations": iters,
        "ms_per_iteration": secs / iters * 1000, "tokens_per_s": tokens / secs,
        "synced_ms_per_iteration": synced_secs / synced_iters * 1000,
        # per synced iteration; _draft_extend (eager) also counts the draft's prefill extends, _commit the prefill's
        # token; draft_extend_graph is the fixed-buffer extend after a verify, where CUDA graphs run it
        "phase_ms": {k: v / synced_iters * 1000 for k, v in times.items()},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", action="append", default=None, help="num_steps,topk,num_draft_tokens (repeatable)")
    p.add_argument("--draft", default=None, help="draft folder (default: the bundled draft)")
    p.add_argument("--num-prompts", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    results = []
    for config in args.config or ["3,1,4"]:
        r = measure(config, args.draft, args.num_prompts, args.max_tokens, args.device)
        results.append(r)
        print(
            f"{config}: {r['ms_per_iteration']:.2f} ms/iteration ({r['tokens_per_s']:.0f} tok/s); synced "
            f"{r['synced_ms_per_iteration']:.2f} ms: " + ", ".join(f"{k} {v:.3f}" for k, v in r["phase_ms"].items())
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
