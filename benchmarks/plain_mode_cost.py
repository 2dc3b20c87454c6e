"""What the speculative engine costs while its adaptive policy decodes plainly: batch 1, greedy, MT-Bench prompts,
three engines in one process, run in turn (plain, speculative held in plain mode, the same with the draft's pass
over each prompt run at prefill instead of deferred to the first speculative iteration). Then one more run of each
with a device sync around the decode graph, the prefill forward and the speculative prefill hook, for per-call
times.

    python benchmarks/plain_mode_cost.py [--num-prompts 40] [--max-tokens 128] [--repeats 4] [--out cost.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from serving.bench import load_prompts
from serving.config import EngineConfig
from serving.engine import Engine
from serving.sampling import SamplingParams

SYSTEMS = ("plain", "spec_plain_deferred", "spec_plain_prefill_draft")


def _engines(device: str | None) -> dict[str, Engine]:
    def make(speculative: bool) -> Engine:
        cfg = EngineConfig(
            device=device or "auto", speculative=speculative, max_running_requests=1, cuda_graph_max_bs=1,
            max_total_tokens=16384,
        )  # fmt: skip
        return Engine(cfg)

    engines = dict(zip(SYSTEMS, (make(False), make(True), make(True))))
    for name in SYSTEMS[1:]:
        engines[name].spec_worker.should_speculate = lambda batch_size: False  # the adaptive policy's plain mode
    engines["spec_plain_prefill_draft"].spec_worker.defer_prefill = False
    return engines


def measure(num_prompts: int, max_tokens: int, repeats: int, device: str | None) -> dict:
    engines = _engines(device)
    dev, sync = engines["plain"].device, engines["plain"].cuda_sync
    prompts = load_prompts("mtbench", 3 + num_prompts, engines["plain"].tokenizer)
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    for engine in engines.values():
        engine.generate(prompts[:3], params)  # compiles and captures outside the timed runs
    timed_prompts = prompts[3:]

    def run(engine):
        sync()
        start = time.perf_counter()
        reqs = engine.generate(timed_prompts, params)
        sync()
        return sum(len(r.output_ids) for r in reqs) / (time.perf_counter() - start), [r.output_ids for r in reqs]

    rates = {name: [] for name in SYSTEMS}
    outputs = {}
    for _ in range(repeats):
        for name, engine in engines.items():
            rate, outputs[name] = run(engine)
            rates[name].append(rate)

    calls: dict[str, list[float]] = {}

    def timed(obj, attr, key):
        """key: a name, or a function of the call's first argument that gives one."""
        fn = getattr(obj, attr)

        def wrapper(*args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            calls.setdefault(key(args[0]) if callable(key) else key, []).append(time.perf_counter() - t0)
            return out

        setattr(obj, attr, wrapper)

    for name, engine in engines.items():
        timed(engine.runner, "decode_greedy_steps", f"{name}:greedy_steps")
        timed(engine.runner, "decode", f"{name}:decode")
        # eager forwards: prefills, and (without CUDA graphs) the decode steps inside runner.decode
        def phase(fb, name=name):
            return f"{name}:{'decode' if fb.mode.is_decode else 'prefill'}_forward"

        timed(engine.runner, "forward", phase)
        if engine.spec_worker is not None:
            timed(engine.spec_worker, "after_prefill", f"{name}:after_prefill")
        engine.generate(timed_prompts[: max(1, num_prompts // 4)], params)
    return {
        "device": str(dev), "num_prompts": num_prompts, "max_tokens": max_tokens,
        "tok_per_s": rates,
        "median": {k: statistics.median(v) for k, v in rates.items()},
        "ratio_to_plain": {k: statistics.median([a / b for a, b in zip(v, rates["plain"])]) for k, v in rates.items()},
        # greedy outputs of the last run; in bf16 they may differ (prefix-cache hits split prefills differently)
        "same_output_as_plain": {k: outputs[k] == outputs["plain"] for k in SYSTEMS},
        "ms_per_call": {k: (len(v), 1000 * sum(v) / len(v)) for k, v in calls.items()},
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=40)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    r = measure(args.num_prompts, args.max_tokens, args.repeats, args.device)
    for k in SYSTEMS:
        print(
            f"{k:26s} " + " ".join(f"{x:7.0f}" for x in r["tok_per_s"][k])
            + f"  median {r['median'][k]:.0f}  paired {r['ratio_to_plain'][k]:.3f}  same={r['same_output_as_plain'][k]}"
        )  # fmt: skip
    for k, (n, ms) in r["ms_per_call"].items():
        print(f"  {k:42s} {n:5d} calls {ms:8.3f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
