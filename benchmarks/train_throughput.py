"""Training-step throughput of `specforge train` on one device: TTT attention unfused / fused, batches in random
order / grouped by length. One trainer (target, data, draft) serves all four; each case times --steps optimizer
steps after --warmup untimed ones, over the same first batches of epoch 0.

    python benchmarks/train_throughput.py --config recipes/smollm2-135m-instruct/config.json \
        --train-data-path regen.jsonl --output-dir /tmp/tp --eval-holdout 0 --report-to none --out tp.json

Every flag but --steps, --warmup and --out goes to `specforge train` (its parser, its checks).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from specforge.args import parse_train_args
from specforge.cli import build_parser
from specforge.core import weighted_loss
from specforge.trainer import Trainer, collate, epoch_batches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each case")
    p.add_argument("--out", default=None, help="JSON results path")
    own, train_flags = p.parse_known_args(argv)
    ns = build_parser().parse_args(["train", *train_flags])
    args = parse_train_args(ns.parser, train_flags)
    trainer = Trainer(args)
    try:
        rows = trainer.train_rows
        dev = trainer.device
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        results = []
        for fused in (False, True):
            trainer.module.fused_attention = fused
            for grouped in (False, True):
                batches = epoch_batches(len(rows), trainer.global_batch, args.seed, 0,
                                        lengths=rows.lengths if grouped else None)  # fmt: skip
                if len(batches) < own.warmup + own.steps:
                    raise SystemExit(f"{len(batches)} batches in an epoch; --warmup + --steps needs "
                                     f"{own.warmup + own.steps}")  # fmt: skip

                def step(i: int) -> int:
                    idx = batches[i]
                    inputs = trainer._inputs(collate(rows, idx, max(rows.lengths[j] for j in idx)))
                    plosses, _, _ = trainer._forward(inputs)
                    weighted_loss(plosses).backward()
                    trainer._step()
                    return sum(rows.lengths[j] for j in idx)

                for i in range(own.warmup):
                    step(i)
                sync()
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                start = time.perf_counter()
                tokens = sum(step(i) for i in range(own.warmup, own.warmup + own.steps))
                sync()
                secs = time.perf_counter() - start
                row = {"fused_attention": fused, "group_by_length": grouped,
                       "ms_per_step": secs / own.steps * 1000, "samples_per_s": own.steps * len(batches[0]) / secs,
                       "tokens_per_s": tokens / secs,
                       "peak_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None}  # fmt: skip
                results.append(row)
                print(f"fused attention {fused!s:<5}  grouped {grouped!s:<5}  {row['ms_per_step']:8.1f} ms/step  "
                      f"{row['samples_per_s']:7.1f} samples/s  {row['tokens_per_s']:9.0f} tokens/s", flush=True)
    finally:
        trainer.close()
    if own.out:
        with open(own.out, "w") as f:
            json.dump({"device": str(dev), "batch_size": args.batch_size, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
