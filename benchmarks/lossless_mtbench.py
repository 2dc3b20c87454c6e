"""Lossless greedy check on the real model: speculative output == non-speculative output, token for token, on the
80 MT-Bench first turns (128 new tokens), at batch 1 and 8, chain (3/1/4) and tree (5/4/16) (or --configs), with a
random-weight draft and with the bundled trained draft. Speculation is forced on every step (no adaptive fallback).

    python benchmarks/lossless_mtbench.py --out docs/results/cpu_lossless_mtbench.json      (CPU, fp32: ~1-2 h)
    python benchmarks/lossless_mtbench.py --out x.json --batch-sizes 8 --drafts trained --configs "recommended=3,2,4"

Results are written after every configuration, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from serving.bench import load_prompts
from serving.config import EngineConfig
from serving.engine import Engine
from serving.models.loader import load_target
from serving.sampling import SamplingParams
from specbundle import DraftConfig, Eagle3DraftModel
from specbundle.checkpoint import save_draft
from specbundle.resolve import resolve_draft

CONFIGS = "chain=3,1,4;tree=5,4,16"  # name=num_steps,topk,num_draft_tokens;...


def parse_configs(text: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for item in text.split(";"):
        name, _, shape = item.partition("=")
        try:
            steps, topk, ntok = (int(x) for x in shape.split(","))
        except ValueError:
            raise SystemExit(f"--configs: {item!r} is not name=num_steps,topk,num_draft_tokens") from None
        out[name.strip()] = (steps, topk, ntok)
    return out


def random_draft(target, folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    draft = Eagle3DraftModel(DraftConfig.for_target(target.hf_config, draft_vocab_size=8192))
    # A random draft vocabulary: any 8192 target ids.
    ids = torch.randperm(target.hf_config.vocab_size)[:8192].sort().values
    draft.d2t.copy_(ids - torch.arange(8192))
    draft.t2d.zero_()
    draft.t2d[ids] = True
    return save_draft(draft, folder, dtype=torch.float32)


def run(engine: Engine, prompts, max_tokens: int) -> tuple[list, float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    start = time.perf_counter()
    reqs = engine.generate(prompts, params)
    return reqs, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="8,1")
    ap.add_argument("--drafts", default="trained,random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--configs", default=CONFIGS, help=f"name=num_steps,topk,num_draft_tokens;... [{CONFIGS}]")
    args = ap.parse_args(argv)
    configs = parse_configs(args.configs)
    device = torch.device(args.device)
    target = load_target(None, args.dtype, device)
    prompts = load_prompts("mtbench", args.num_prompts, target.tokenizer)
    tmp = Path(tempfile.mkdtemp())
    drafts = {
        "trained": str(resolve_draft(target.target_id, None)),
        "random": str(random_draft(target, tmp / "random")),
    }
    kv = args.max_tokens + max(len(p) for p in prompts) + 64
    results = {
        "device": str(device),
        "dtype": args.dtype,
        "num_prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "command": "python benchmarks/lossless_mtbench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "runs": [],
    }
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        base_cfg = dict(
            device=args.device, dtype=args.dtype, max_running_requests=batch, max_total_tokens=batch * kv * 2
        )
        reqs, secs = run(Engine(EngineConfig(**base_cfg), target), prompts, args.max_tokens)
        plain = [list(r.output_ids) for r in reqs]
        results["runs"].append(
            {"batch": batch, "system": "plain", "seconds": secs, "output_tokens": sum(map(len, plain))}
        )
        for name in args.drafts.split(","):
            for shape, (steps, topk, ntok) in configs.items():
                cfg = EngineConfig(
                    **base_cfg,
                    speculative=True,
                    speculative_draft_model_path=drafts[name],
                    speculative_num_steps=steps,
                    speculative_eagle_topk=topk,
                    speculative_num_draft_tokens=ntok,
                    disable_speculative_adaptive=True,
                    speculative_max_batch_size=batch,
                )
                reqs, secs = run(Engine(cfg, target), prompts, args.max_tokens)
                spec = [list(r.output_ids) for r in reqs]
                reqs_equal = [a == b for a, b in zip(spec, plain)]
                first_diff = [
                    {
                        "prompt": i,
                        "plain_len": len(b),
                        "spec_len": len(a),
                        "position": next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))),
                    }
                    for i, (a, b) in enumerate(zip(spec, plain))
                    if a != b
                ]
                row = {
                    "batch": batch,
                    "system": "speculative",
                    "draft": name,
                    "shape": shape,
                    "config": f"{steps}/{topk}/{ntok}",
                    "identical": sum(reqs_equal),
                    "of": len(prompts),
                    "first_differences": first_diff,
                    "seconds": secs,
                    "output_tokens": sum(map(len, spec)),
                }
                verify = sum(r.spec.num_verify_steps for r in reqs)
                row["accept_length"] = (sum(r.spec.num_accepted_tokens for r in reqs) + verify) / max(1, verify)
                results["runs"].append(row)
                print(
                    f"batch {batch} {name:8s} {shape:5s}: {row['identical']}/{len(prompts)} identical, "
                    f"accept length {row.get('accept_length', float('nan')):.2f}, {secs:.0f} s",
                    flush=True,
                )
                Path(args.out).write_text(json.dumps(results, indent=1))
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
