"""Teacher-forced (TTT) accuracy of EAGLE-3 drafts on the target's own answers, and the chain accept length it
implies: what a draft will achieve when served, measured without serving it.

    python benchmarks/draft_accuracy.py --drafts specbundle/bundles/smollm2-135m-instruct-eagle3 [other drafts]
    python benchmarks/draft_accuracy.py --drafts DRAFT --conversations regenerated.jsonl --split-at 128

MT-Bench (default): the target answers the 80 first turns greedily (128 tokens, the engine on CPU in fp32), then
each draft is unrolled over prompt + answer exactly as in training (specforge.core), counting answer tokens only.
--conversations instead scores the first assistant turn of normalized JSONL rows (e.g. `specforge regenerate`
output), and --split-at reports answer tokens before and after that position separately. --by-category also
scores each MT-Bench category (writing, roleplay, reasoning, math, coding, extraction, stem, humanities) alone.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from specbundle.checkpoint import load_draft
from specforge.core import Eagle3TrainModule, accept_length, prepare_targets

MAX_LENGTH = 2048  # as the recipes train


def mtbench_answers(num_prompts: int, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    from serving.bench import load_prompts
    from serving.config import EngineConfig
    from serving.engine import Engine
    from serving.models.loader import load_target
    from serving.sampling import SamplingParams

    target = load_target(None, "float32", torch.device("cpu"))
    prompts = load_prompts("mtbench", num_prompts, target.tokenizer)
    engine = Engine(
        EngineConfig(device="cpu", dtype="float32", max_running_requests=8, max_total_tokens=8 * 1024), target
    )
    reqs = engine.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0))
    return [(p, list(r.output_ids)) for p, r in zip(prompts, reqs)]


def training_split(path: str, tokenizer, which: str, holdout: int, seed: int) -> set[int]:
    """Indices (0-based, in file order) of the rows that `specforge train --train-data-path path --eval-holdout holdout
    --seed seed` evaluates on ("heldout") or trains on ("train"): rows without assistant tokens within MAX_LENGTH
    are dropped first, as training drops them."""
    from specforge.data.dataset import tokenize_rows
    from specforge.trainer import holdout_split

    reasons = tokenize_rows(path, tokenizer, MAX_LENGTH)["drop_reason"]
    keep = [i for i, r in enumerate(reasons) if not r]
    train_idx, eval_idx = holdout_split(len(keep), holdout, seed)
    return {keep[i] for i in (eval_idx if which == "heldout" else train_idx)}


def conversation_answers(path: str, limit: int, tokenizer, rows: set[int] | None = None):
    """(prompt, answer) token ids of each row's first assistant turn, tokenized as training tokenizes it (the
    answer is the loss-masked span: content and end-of-turn token); rows: only these (0-based line order)."""
    from specforge.data.formats import RowError, read_normalized
    from specforge.data.template import tokenize_conversation

    out = []
    for k, (_, row) in enumerate(read_normalized(path)):
        if isinstance(row, RowError) or (rows is not None and k not in rows):
            continue
        msgs = row["conversations"]
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if first is None:
            continue
        tok = tokenize_conversation(tokenizer, msgs[: first + 1], MAX_LENGTH)
        mask = tok["loss_mask"]
        if 1 not in mask:
            continue
        start, end = mask.index(1), len(mask) - mask[::-1].index(1)
        out.append((tok["input_ids"][:start], tok["input_ids"][start:end]))
        if len(out) >= limit:
            break
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafts", nargs="+", required=True, help="draft folders (config.json + model.safetensors)")
    p.add_argument("--conversations", default=None, help="normalized JSONL instead of MT-Bench")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--max-tokens", type=int, default=128, help="MT-Bench answer length")
    p.add_argument("--ttt-length", type=int, default=3, help="draft positions scored (the chain's num_steps)")
    p.add_argument("--split-at", type=int, default=None, help="also score answer tokens before / after this index")
    p.add_argument("--by-category", action="store_true", help="MT-Bench: also score each question category alone")
    p.add_argument("--rows", choices=["all", "heldout", "train"], default="all",
                   help="with --conversations: only the rows that training with --eval-holdout/--seed holds out, or "
                   "only those it trains on")  # fmt: skip
    p.add_argument("--eval-holdout", type=int, default=256, help="as given to `specforge train` (for --rows)")
    p.add_argument("--seed", type=int, default=0, help="as given to `specforge train` (for --rows)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.by_category and args.conversations:
        p.error("--by-category needs MT-Bench (the conversations carry no category)")
    if args.rows != "all" and not args.conversations:
        p.error("--rows needs --conversations")

    from serving.models.loader import resolve_model_path
    from specforge.target import TargetModel, load_tokenizer

    folder, _ = resolve_model_path(None)
    drafts = [load_draft(d, dtype=torch.float32) for d in args.drafts]
    aux_ids = drafts[0].config.aux_layer_ids  # None: the default layers for the target's depth
    if args.conversations:
        tokenizer = load_tokenizer(folder)
        rows = None if args.rows == "all" else training_split(
            args.conversations, tokenizer, args.rows, args.eval_holdout, args.seed)
        pairs = conversation_answers(args.conversations, args.num_prompts, tokenizer, rows)
    else:
        pairs = mtbench_answers(args.num_prompts, args.max_tokens)
    categories = [None] * len(pairs)
    if args.by_category:
        from specbundle.assets import mtbench_questions

        categories = [q["category"] for q in mtbench_questions()[: len(pairs)]]
    target = TargetModel.from_pretrained(folder, dtype="float32", device="cpu", aux_layer_ids=aux_ids)
    parts = {"all": (0, None)}
    if args.split_at:
        parts.update({f"before_{args.split_at}": (0, args.split_at), f"from_{args.split_at}": (args.split_at, None)})
    k = args.ttt_length
    unrolls = [Eagle3TrainModule(draft, k).eval() for draft in drafts]
    groups = list(parts) + [f"category_{c}" for c in dict.fromkeys(categories) if c is not None]
    sums = {(d, group): torch.zeros(2, k) for d in range(len(drafts)) for group in groups}
    with torch.no_grad():
        for (prompt, answer), category in zip(pairs, categories):
            ids = torch.tensor([prompt + answer])
            mask = torch.ones_like(ids)
            out = target(ids, mask)
            embeds = target.embed(ids)
            for part, (lo, hi) in parts.items():
                loss_mask = torch.zeros_like(ids)
                # position t predicts x_{t+2}: answer token j is scored from position len(prompt) - 2 + j
                start = len(prompt) - 1 + lo
                loss_mask[0, start : None if hi is None else len(prompt) - 1 + hi] = 1
                if loss_mask.sum() == 0:
                    continue
                for d, (draft, unroll) in enumerate(zip(drafts, unrolls)):
                    tg = prepare_targets(out.logits, draft.t2d, loss_mask, mask, k)
                    _, correct, counted = unroll(
                        embeds, out.aux_hidden, tg.target_p, tg.position_mask, tg.loss_mask, mask
                    )
                    hits = torch.stack([correct.float(), counted.float()])
                    sums[(d, part)] += hits
                    if category is not None and part == "all":
                        sums[(d, f"category_{category}")] += hits
    source = args.conversations or f"mtbench first turns, {args.max_tokens} greedy tokens"
    if args.rows != "all":
        source += f" ({args.rows} rows at --eval-holdout {args.eval_holdout} --seed {args.seed})"
    result = {"source": source,
              "answers": len(pairs), "drafts": []}  # fmt: skip
    for d, path in enumerate(args.drafts):
        row = {"draft": path}
        for part in groups:
            c, n = sums[(d, part)]
            acc = (c / n.clamp_min(1)).tolist()
            row[part] = {"acc": [round(a, 4) for a in acc], "implied_chain_accept_length": round(accept_length(acc), 3),
                         "tokens": int(n[0])}  # fmt: skip
        result["drafts"].append(row)
        print(f"{path}: " + "; ".join(
            f"{part} acc {' '.join(f'{a:.3f}' for a in row[part]['acc'])} -> chain accept "
            f"{row[part]['implied_chain_accept_length']:.3f}" for part in groups))  # fmt: skip
    if args.out:
        open(args.out, "w").write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
