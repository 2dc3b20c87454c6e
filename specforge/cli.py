"""`specforge`: train EAGLE-3 drafts (online or offline), precompute hidden states, build vocab maps, prepare data.

    specforge prepare-data ...             normalize chat data to JSONL (see `specforge prepare-data -h`)
    specforge prepare-hidden-states ...    run the target once, store aux/last hidden states for offline training
    specforge train ...                    train a draft; launch with torchrun for several GPUs/nodes
"""

from __future__ import annotations

import argparse
import os
import sys


def _add_train(sub) -> None:
    from specforge.args import add_dataclass_args

    p = sub.add_parser(
        "train", help="train an EAGLE-3 draft (online, or offline with --train-hidden-states-path)",
        description="Train an EAGLE-3 draft head with training-time test. Same defaults as SpecForge "
                    "(lr 1e-4, warmup 0.015 + cosine, max grad norm 0.5, TTT length 7, max length 2048, draft vocab "
                    "32000, bf16 on GPU). Several GPUs/nodes: "
                    "`torchrun --nproc_per_node N -m specforge.cli train ...`. "
                    "Checkpoints: <output-dir>/epoch_E_step_S/ (SGLang-loadable draft + training_state/), "
                    "<output-dir>/latest.",
    )
    add_dataclass_args(p)
    p.set_defaults(func=_run_train, parser=p)


def _run_train(ns: argparse.Namespace, argv: list[str]) -> int:
    """argv: the flags after `train` (parsed again so that --config can supply defaults)."""
    from specforge.args import parse_train_args
    from specforge.trainer import run_training

    args = parse_train_args(ns.parser, argv)
    folder = run_training(args)
    if folder is not None and os.environ.get("RANK", "0") == "0":
        print(f"draft saved to {folder}")
    return 0


def _add_prepare_hidden_states(sub) -> None:
    p = sub.add_parser(
        "prepare-hidden-states", help="run the target once over the data and store what offline training needs",
        description="Writes <output-dir>/meta.json, target_head.safetensors (lm_head + embedding, once) and "
                    "shard_r*_*.safetensors (input_ids, loss_mask, aux hidden states, final-norm hidden states). "
                    "Under torchrun the ranks split the samples; for a target too big for one GPU run one process "
                    "with --device-map auto.",
    )
    p.add_argument("--target-model-path", default=None, help="HF folder, Hub id or .gguf (default: SmolLM2 GGUF)")
    p.add_argument("--train-data-path", "--data-path", dest="data_path", required=True,
                   help="normalized chat JSONL or tokenized dataset folder")
    p.add_argument("--output-dir", required=True, help="hidden-states folder to write")
    p.add_argument("--max-length", type=int, default=2048, help="[default: 2048]")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per forward [default: 1]")
    p.add_argument("--chat-template", default=None)
    p.add_argument("--build-dataset-num-proc", type=int, default=8, help="[default: 8]")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--aux-layer-ids", type=int, nargs=3, default=None, help="[default: 1, N//2-1, N-4]")
    p.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float32"), help="target compute dtype")
    p.add_argument("--storage-dtype", default="bfloat16", choices=("bfloat16", "float32", "auto"),
                   help="dtype of the stored hidden states [default: bfloat16]")
    p.add_argument("--device", default=None)
    p.add_argument("--device-map", default=None, help="transformers device_map (e.g. auto) for big targets")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard file [default: 1000]")
    p.set_defaults(func=_run_prepare_hidden_states)


def _run_prepare_hidden_states(ns: argparse.Namespace) -> int:
    from specforge.hidden_states import prepare_hidden_states
    from specforge.trainer import _default_target

    meta = prepare_hidden_states(
        ns.target_model_path or _default_target(), ns.data_path, ns.output_dir, max_length=ns.max_length,
        batch_size=ns.batch_size, chat_template=ns.chat_template, num_proc=ns.build_dataset_num_proc,
        cache_dir=ns.cache_dir, aux_layer_ids=ns.aux_layer_ids, dtype=ns.dtype, device=ns.device,
        device_map=ns.device_map, shard_size=ns.shard_size, storage_dtype=ns.storage_dtype,
    )
    if meta is not None:
        print(f"wrote {meta['num_samples']} samples in {len(meta['shards'])} shard(s) to {ns.output_dir}")
    return 0


def _add_build_vocab(sub) -> None:
    from specforge.args import DEFAULT_DRAFT_VOCAB

    p = sub.add_parser("build-vocab", help="write the draft vocabulary map (d2t, t2d) of a tokenized dataset",
                       description="Counts tokens under the loss mask and keeps the draft-vocab-size most frequent; "
                                   "writes a safetensors file with d2t [Vd] and t2d [V].")
    p.add_argument("--train-data-path", "--data-path", dest="data_path", required=True)
    p.add_argument("--target-model-path", default=None)
    p.add_argument("--draft-vocab-size", type=int, default=DEFAULT_DRAFT_VOCAB,
                   help=f"[default: {DEFAULT_DRAFT_VOCAB}]")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--chat-template", default=None)
    p.add_argument("--output", required=True, help="safetensors file to write")
    p.set_defaults(func=_run_build_vocab)


def _run_build_vocab(ns: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from specforge.args import TrainArgs
    from specforge.target import load_target_config
    from specforge.trainer import TokenRows, _default_target, load_token_dataset, vocab_mapping

    target = ns.target_model_path or _default_target()
    args = TrainArgs(train_data_path=ns.data_path, output_dir=".", max_length=ns.max_length,
                     chat_template=ns.chat_template)
    rows = TokenRows(load_token_dataset(ns.data_path, target, args), ns.max_length)
    vocab_size = int(load_target_config(target).vocab_size)
    d2t, t2d = vocab_mapping(rows, vocab_size, min(ns.draft_vocab_size, vocab_size))
    save_file({"d2t": d2t, "t2d": t2d}, ns.output)
    print(f"wrote {ns.output}: {int(t2d.sum())} of {vocab_size} target tokens in the draft vocabulary")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specforge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_train(sub)
    _add_prepare_hidden_states(sub)
    _add_build_vocab(sub)
    try:
        from specforge.data.commands import add_subcommands
    except ImportError:  # the data subcommands ship in specforge.data; a partial install still trains
        add_subcommands = None
    if add_subcommands is not None:
        add_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    if getattr(ns, "func", None) is None:
        parser.print_help()
        return 2
    if ns.command == "train":
        return _run_train(ns, argv[argv.index("train") + 1:])
    return int(ns.func(ns) or 0)


if __name__ == "__main__":
    sys.exit(main())
