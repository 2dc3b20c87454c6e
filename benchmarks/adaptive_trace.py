"""Where the adaptive speculative engine's time goes against the plain engine, as `specserve bench` runs them: per
decode iteration, whether it speculated, the tokens it committed, its wall time (synced) and the CUDA graphs it
captured. The two systems alternate over several passes of the same prompts; one line per pass.

    python benchmarks/adaptive_trace.py --batch-sizes 4,16 [--num-prompts 80] [--max-tokens 128] [--passes 3]
        [--warm-up bench|short] [--out trace.json]

--warm-up short is the bench's warm-up before session 7 (a batch of 16-token requests): the draft's CUDA graphs are
then captured on first use, inside the timed passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from serving import cuda_graph_runner
from serving.bench import _engine, _warm_up, build_parser, load_prompts, run_offline

SYSTEMS = ("plain", "speculative")


def _trace(engine, iterations: list) -> None:
    """Wrap the engine's decode iteration: (speculative, batch, tokens, seconds, graphs captured) per iteration."""
    run_decode, decode_step = engine._run_decode, engine._decode_step
    last = {}

    def step():
        last["speculative"] = decode_step()
        return last["speculative"]

    def run():
        reqs = list(engine.running)
        before = sum(len(r.output_ids) for r in reqs)
        captures = cuda_graph_runner.captures
        start = time.perf_counter()
        run_decode()
        engine.cuda_sync()
        tokens = sum(len(r.output_ids) for r in reqs) - before
        iterations.append((last["speculative"], len(reqs), tokens, time.perf_counter() - start,
                           cuda_graph_runner.captures - captures))  # fmt: skip

    engine._decode_step, engine._run_decode = step, run


def summarize(iterations: list) -> dict:
    spec = [x for x in iterations if x[0]]
    plain = [x for x in iterations if not x[0]]
    captured = [x for x in iterations if x[4]]
    return {
        "speculative_iterations": len(spec), "speculative_seconds": sum(x[3] for x in spec),
        "speculative_tokens": sum(x[2] for x in spec),
        "plain_iterations": len(plain), "plain_seconds": sum(x[3] for x in plain),
        "plain_tokens": sum(x[2] for x in plain),
        "captures": sum(x[4] for x in iterations), "capture_iterations_seconds": sum(x[3] for x in captured),
        "mode_switches": sum(1 for a, b in zip(iterations, iterations[1:]) if a[0] != b[0]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="4,16")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--warm-up", choices=["bench", "short"], default="bench")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    bench_args = ["run", "--speculative", "--num-prompts", str(args.num_prompts), "--max-tokens", str(args.max_tokens)]
    bench = build_parser().parse_args(bench_args + (["--device", args.device] if args.device else []))
    bench.kv_tokens_per_request = 4096
    first = _engine(bench, False, 1)
    prompts = load_prompts("mtbench", args.num_prompts, first.tokenizer)
    bench.kv_tokens_per_request = max(len(q) for q in prompts) + args.max_tokens + 64
    results = {}
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        engines = {name: _engine(bench, name == "speculative", batch, first.target) for name in SYSTEMS}
        traces = {name: [] for name in engines}
        for name, engine in engines.items():
            if args.warm_up == "bench":
                _warm_up(engine, prompts, batch, args.max_tokens)
            else:
                run_offline(engine, prompts[: max(4, batch)], 16, progress=False)
            _trace(engine, traces[name])
        passes = []
        for i in range(args.passes):
            row = {}
            for name, engine in engines.items():
                engine.flush_cache()
                n0 = len(traces[name])
                res = run_offline(engine, prompts, args.max_tokens, progress=False)
                row[name] = {"output_tokens_per_s": res["output_tokens_per_s"], "seconds": res["seconds"],
                             **summarize(traces[name][n0:]), "iterations": traces[name][n0:]}  # fmt: skip
            passes.append(row)
            pl, sp = row["plain"], row["speculative"]
            print(
                f"batch {batch} pass {i}: plain {pl['output_tokens_per_s']:.0f} tok/s "
                f"(decode {pl['plain_seconds']:.2f} s) | speculative {sp['output_tokens_per_s']:.0f} tok/s: "
                f"{sp['speculative_iterations']} speculative "
                f"iterations {sp['speculative_seconds']:.2f} s {sp['speculative_tokens']} tokens, "
                f"{sp['plain_iterations']} plain {sp['plain_seconds']:.2f} s {sp['plain_tokens']} tokens, "
                f"{sp['captures']} captures in iterations taking {sp['capture_iterations_seconds']:.2f} s, "
                f"{sp['mode_switches']} switches"
            )  # fmt: skip
        results[str(batch)] = passes
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
