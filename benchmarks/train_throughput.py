"""Training-step throughput of `specforge train` on one device: TTT attention unfused / fused, batches in random
order / grouped by length. One trainer (target, data, draft) serves all four; each case times --steps optimizer
steps after --warmup untimed ones, over the same first batches of epoch 0.

    python benchmarks/train_throughput.py --config recipes/smollm2-135m-instruct/config.json \
        --train-data-path regen.jsonl --output-dir /tmp/tp --eval-holdout 0 --report-to none --out tp.json

--phases also times each part of a step (batch collation, target forward with its TTT targets, draft forward,
backward, optimizer step) with a device sync after each. Every other flag goes to `specforge train`.
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

PHASES = ["collate", "target", "draft_forward", "backward", "optimizer"]


def time_case(trainer: Trainer, batches: list[list[int]], warmup: int, steps: int, phases: bool) -> dict:
    """Optimizer steps over batches[warmup:warmup+steps] after `warmup` untimed ones."""
    rows, dev = trainer.train_rows, trainer.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    spent = dict.fromkeys(PHASES, 0.0)

    def step(idx: list[int]) -> int:
        marks = [time.perf_counter()]

        def mark():
            if phases:
                sync()
                marks.append(time.perf_counter())

        batch = collate(rows, idx, max(rows.lengths[j] for j in idx))
        mark()
        inputs = trainer._inputs(batch)
        mark()
        plosses, _, _ = trainer._forward(inputs)
        mark()
        weighted_loss(plosses).backward()
        mark()
        trainer._step()
        mark()
        for name, a, b in zip(PHASES, marks, marks[1:]):
            spent[name] += b - a
        return sum(rows.lengths[j] for j in idx)

    for idx in batches[:warmup]:
        step(idx)
    spent.update(dict.fromkeys(PHASES, 0.0))
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    start = time.perf_counter()
    tokens = sum(step(idx) for idx in batches[warmup : warmup + steps])
    sync()
    secs = time.perf_counter() - start
    row = {
        "ms_per_step": secs / steps * 1000, "samples_per_s": steps * len(batches[0]) / secs,
        "tokens_per_s": tokens / secs,
        "peak_gb": torch.cuda.max_memory_allocated(dev) / 1e9 if dev.type == "cuda" else None,
    }  # fmt: skip
    if phases:
        row["phase_ms"] = {k: v / steps * 1000 for k, v in spent.items()}
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="timed optimizer steps per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each case")
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--phases", action="store_true", help="also time each part of a step (synced)")
    own, train_flags = p.parse_known_args(argv)
    ns = build_parser().parse_args(["train", *train_flags])
    args = parse_train_args(ns.parser, train_flags)
    trainer = Trainer(args)
    try:
        rows = trainer.train_rows
        results = []
        for fused in (False, True):
            trainer.module.fused_attention = fused
            for grouped in (False, True):
                batches = epoch_batches(len(rows), trainer.global_batch, args.seed, 0,
                                        lengths=rows.lengths if grouped else None)  # fmt: skip
                if len(batches) < own.warmup + own.steps:
                    raise SystemExit(f"{len(batches)} batches in an epoch; --warmup + --steps needs "
                                     f"{own.warmup + own.steps}")  # fmt: skip
                row = {"fused_attention": fused, "group_by_length": grouped,
                       **time_case(trainer, batches, own.warmup, own.steps, own.phases)}  # fmt: skip
                results.append(row)
                print(
                    f"fused attention {fused!s:<5}  grouped {grouped!s:<5}  {row['ms_per_step']:8.1f} ms/step  "
                    f"{row['samples_per_s']:7.1f} samples/s  {row['tokens_per_s']:9.0f} tokens/s",
                    flush=True,
                )
    finally:
        trainer.close()
    if own.out:
        with open(own.out, "w") as f:
            json.dump({"device": str(trainer.device), "batch_size": args.batch_size, "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
