"""Short table of the GPU results written by benchmarks/run_gpu.sh (missing files are skipped).

python benchmarks/gpu_summary.py bench_out/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path, name: str):
    path = folder / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    folder = Path(argv[0] if argv else "bench_out")
    lines = ["| measurement | result |", "| --- | --- |"]
    k = _load(folder, "h200_kernels.json")
    if k:
        for r in k["results"]:
            splits = r.get("num_kv_splits", "-")
            lines.append(
                f"| {r['kernel']} b{r['batch']} splits {splits} | {r['time_us']:.1f} us, "
                f"{r['pct_of_copy']:.0f}% of copy, {r['speedup_vs_sdpa']:.2f}x SDPA, ok={r['ok']} |"
            )
    e = _load(folder, "h200_engine.json")
    if e:
        d, a, l8, h = e.get("decode", {}), e.get("agree", {}), e.get("llama8b", {}), e.get("hf", {})
        if "tokens_per_s" in d:
            lines.append(
                f"| SmolLM2 bf16 b1 decode | {d['tokens_per_s']:.0f} tok/s "
                f"({d.get('tokens_per_s_one_step_per_round', float('nan')):.0f} one step per round) |"
            )
        if "fp32_identical" in a:
            lines.append(
                f"| greedy vs torch path | fp32 {a['fp32_identical']}/{a['prompts']}, "
                f"bf16 {a['bf16_identical']}/{a['prompts']} |"
            )
        if "decode_step_ms" in l8:
            lines.append(
                f"| Llama-8B shape decode b1 | {l8['decode_step_ms']:.2f} ms = "
                f"{l8['decode_over_floor']:.2f}x weight read |"
            )
            lines.append(
                f"| Llama-8B shape tree64 forward | {l8['tree64_forward_ms']:.2f} ms = "
                f"{l8['tree64_over_decode']:.2f}x decode |"
            )
        if "output_tokens_per_s" in h:
            lines.append(f"| transformers generate bf16 | {h['output_tokens_per_s']:.1f} tok/s |")
    for name in ("h200_speculative.json", "h200_accept_chain.json", "h200_accept_tree.json"):
        s = _load(folder, name)
        if not s:
            continue
        for r in s["rows"]:
            if r["system"] != "speculative":
                continue
            lines.append(
                f"| {name[5:-5]} b{r['batch']} {r.get('spec_config', '')} | "
                f"{r['output_tokens_per_s']:.0f} tok/s, {r['speedup']:.2f}x, "
                f"accept {r.get('accept_length') or float('nan'):.2f} |"
            )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
