"""Launch-configuration sweep of the decode and tree-verify attention kernels at Llama-3.1-8B shapes (CUDA).

    python benchmarks/tune_attention.py --out tune_attention.json [--seconds 240]
    TRITON_INTERPRET=1 python benchmarks/tune_attention.py --device cpu --batch-sizes 2 --prefix 19 ...  (smoke test)

Decode: keys per block x warps x pipeline stages x KV splits; tree verify: query rows per program x keys per block x
warps x stages (unsplit prefix). Each configuration is timed as bench_kernels.py times kernels (`bench_ms`: CUDA-graph
replays, L2 flushed before each) on a fresh paged cache; the best few per shape are timed again on new caches to
show how stable they are. SDPA on the gathered K/V is timed beside them. Prints the best configurations per shape
last. (docs/results/h200_tune_attention.json predates the graph timing: eager triton do_bench.)
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_kernels  # noqa: E402
from bench_kernels import FLUSH_MODES, bench_ms, copy_bandwidth, decode_case, tree_case  # noqa: E402

decode_mod = importlib.import_module("kernels.decode_attention")
extend_mod = importlib.import_module("kernels.extend_attention")


def set_config(kernel: str, cfg: dict) -> None:
    if kernel == "decode":
        decode_mod.BLOCK_N_GPU, decode_mod.NUM_WARPS_GPU, decode_mod.NUM_STAGES_GPU = (
            cfg["block_n"], cfg["num_warps"], cfg["num_stages"]
        )  # fmt: skip
        decode_mod.FUSED_MERGE_GPU = bool(cfg["fused_merge"])
    else:
        extend_mod.ROWS_GPU, extend_mod.BLOCK_N_GPU = cfg["rows"], cfg["block_n"]
        extend_mod.NUM_WARPS_GPU, extend_mod.NUM_STAGES_GPU = cfg["num_warps"], cfg["num_stages"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tune_attention.json")
    p.add_argument("--batch-sizes", default="8,32")
    p.add_argument("--prefix", type=int, default=4096)
    p.add_argument("--tree-tokens", type=int, default=64)
    p.add_argument(
        "--seconds",
        type=float,
        default=240.0,
        help="sweep time in all (split evenly between the kernels); untimed configurations are skipped",
    )
    p.add_argument("--kernels", default="decode,tree", help="which sweeps to run")
    p.add_argument(
        "--decode-grid",
        default=None,
        type=lambda t: tuple(tuple(int(x) for x in part.split(",")) for part in t.split("/")),
        help="decode sweep as BLOCK_NS/WARPS/STAGES/SPLITS, e.g. 64,128/4/2,3/0,4,16 (default: a wide grid)",
    )
    p.add_argument("--fused-merge", default="1,0", help="decode split merges to sweep: 1 in stage 1, 0 by a launch")
    p.add_argument("--precise-pv", default="0", help="P.V products to sweep: 0 bf16 (the default), 1 split (precise)")
    p.add_argument("--flush", default=bench_kernels.FLUSH, choices=FLUSH_MODES, help="as in bench_kernels.py")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--rep", type=int, default=40)
    p.add_argument("--recheck", type=int, default=3, help="best configurations per shape timed again")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: script smoke test only")
    args = p.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.device == "cuda" and (interpret or not torch.cuda.is_available()):
        print("tune_attention.py needs a CUDA GPU (and TRITON_INTERPRET unset); nothing was measured.")
        return 2
    if args.device == "cpu" and not interpret:
        print("--device cpu needs TRITON_INTERPRET=1 (set before start-up).")
        return 2
    dev = args.device
    bench_kernels.FLUSH = args.flush
    gen = torch.Generator(device=dev).manual_seed(0)
    # The interpreter mis-computes bf16 dots, so the CPU smoke test uses fp16; its launch settings are ignored there.
    dtype = torch.bfloat16 if dev == "cuda" else torch.float16
    copy = copy_bandwidth(1 << 30 if dev == "cuda" else 1 << 20, 25, 100, dev)
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    defaults = {
        "decode": {"block_n": decode_mod.BLOCK_N_GPU, "num_warps": decode_mod.NUM_WARPS_GPU,
                   "num_stages": decode_mod.NUM_STAGES_GPU, "fused_merge": int(decode_mod.FUSED_MERGE_GPU),
                   "precise_pv": 0},
        "tree": {"rows": extend_mod.ROWS_GPU, "block_n": extend_mod.BLOCK_N_GPU, "num_warps": extend_mod.NUM_WARPS_GPU,
                 "num_stages": extend_mod.NUM_STAGES_GPU},
    }  # fmt: skip
    grids = {
        "decode": [
            {"block_n": bn, "num_warps": w, "num_stages": s, "splits": sp, "fused_merge": fm, "precise_pv": pv}
            for bn, w, s, sp, fm, pv in itertools.product(
                *(args.decode_grid or ((32, 64, 128), (4, 8), (2, 3, 4), (8, 16, 32, 4))),
                *([int(x) for x in a.split(",") if x] for a in (args.fused_merge, args.precise_pv)),
            )
        ],
        "tree": [
            {"rows": r, "block_n": bn, "num_warps": w, "num_stages": s, "splits": 1, "precise_pv": pv}
            for r, bn, w, s, pv in itertools.product(
                (64, 128, 256), (32, 64, 128), (4, 8), (2, 3), [int(x) for x in args.precise_pv.split(",") if x]
            )
        ],
    }
    results: list[dict] = []
    sdpa_us: dict[str, float] = {}

    def measure(kernel, batch, cfg, case):
        run, ref, _, nbytes = case
        set_config(kernel, cfg)
        try:
            pv = bool(cfg["precise_pv"])
            splits = cfg["splits"]
            err = (run(splits, pv).float() - ref.float()).abs().max().item()
            us = bench_ms(lambda: run(splits, pv), args.warmup, args.rep, dev) * 1e3
        except Exception as e:  # a configuration that does not compile (shared memory, registers) is skipped
            return {"kernel": kernel, "batch": batch, **cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        return {"kernel": kernel, "batch": batch, **cfg, "time_us": us, "pct_of_copy": 100 * nbytes / us / 1e3 /
                copy["GBps"], "max_abs_err": err}  # fmt: skip

    kernels = [k for k in ("decode", "tree") if k in args.kernels.split(",")]
    for kernel in kernels:
        deadline = time.monotonic() + args.seconds / len(kernels)  # shared by the batch sizes
        for batch in batches:
            case = (decode_case(batch, args.prefix, gen, dtype) if kernel == "decode"
                    else tree_case(batch, args.prefix, args.tree_tokens, gen, dtype))  # fmt: skip
            key = f"{kernel} b{batch}"
            sdpa_us[key] = bench_ms(case[2], 25, 100, dev) * 1e3
            print(f"{key}: sdpa {sdpa_us[key]:.1f} us", flush=True)
            for i, cfg in enumerate(grids[kernel]):
                if i and time.monotonic() > deadline:
                    break
                results.append(measure(kernel, batch, cfg, case))
            del case
            if dev == "cuda":
                torch.cuda.empty_cache()
    # Recheck the best configurations (and the current default) on fresh caches.
    rechecks: list[dict] = []
    for kernel in kernels:
        for batch in batches:
            done = [r for r in results if r["kernel"] == kernel and r["batch"] == batch and "time_us" in r]
            best = sorted(done, key=lambda r: r["time_us"])[: args.recheck]
            default = [r for r in done if all(r[k] == v for k, v in defaults[kernel].items() if v is not None)]
            for r in best + default[:2]:
                cfg = {k: r[k] for k in grids[kernel][0]}
                times = []
                for _ in range(2):
                    case = (decode_case(batch, args.prefix, gen, dtype) if kernel == "decode"
                            else tree_case(batch, args.prefix, args.tree_tokens, gen, dtype))  # fmt: skip
                    m = measure(kernel, batch, cfg, case)
                    times.append(m.get("time_us"))
                    del case
                rechecks.append({"kernel": kernel, "batch": batch, **cfg, "first_us": r["time_us"], "again_us": times,
                                 "sdpa_us": sdpa_us[f"{kernel} b{batch}"]})  # fmt: skip
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    report = {"device": device_name, "copy_bandwidth": copy, "l2_flush": args.flush, "defaults": defaults,
              "sdpa_us": sdpa_us, "results": results, "rechecks": rechecks}  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"copy {copy['GBps']:.0f} GB/s; {len(results)} configurations timed")
    for r in rechecks:
        cfg = {k: r[k] for k in r if k not in ("kernel", "batch", "first_us", "again_us", "sdpa_us")}
        again = ", ".join(f"{t:.1f}" if t else "-" for t in r["again_us"])
        line = f"{r['kernel']:>6} b{r['batch']:<3} {cfg}  {r['first_us']:.1f} us (again {again})"
        print(f"{line}  sdpa {r['sdpa_us']:.1f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(1)
