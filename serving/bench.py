"""`specserve bench`: speculative serving against its baselines, offline (engine in process) or online (HTTP
against any OpenAI-compatible server). Prints a table, writes JSON and PNG plots.

    specserve bench --speculative --batch-sizes 1,4,16,64 --out bench.json
    specserve bench --mode online --base-url http://127.0.0.1:30000 --concurrency 1,8
    specserve bench sweep --speculative --batch-size 1   (best num_steps/topk/num_draft_tokens -> bundle.json)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from serving.config import EngineConfig
from serving.metrics import EngineMetrics
from serving.sampling import SamplingParams

# --- prompts --------------------------------------------------------------------------------------------------


def load_prompts(dataset: str, num: int, tokenizer, seed: int = 0, random_len: int = 128) -> list[list[int]]:
    """Chat-formatted token ids: MT-Bench first turns, ShareGPT first human turns, or random ids."""
    if dataset == "random":
        rng = random.Random(seed)
        vocab = len(tokenizer)
        return [[rng.randrange(100, vocab) for _ in range(random_len)] for _ in range(num)]
    if dataset == "mtbench":
        from specbundle.assets import mtbench_questions

        texts = [q["turns"][0] for q in mtbench_questions()]
    elif dataset == "sharegpt":
        from specbundle.assets import sharegpt_path

        texts = []
        for row in _json_list_rows(sharegpt_path().read_text()):
            turns = row.get("conversations") or []
            if turns and turns[0].get("from") == "human" and 0 < len(turns[0].get("value", "")) < 2000:
                texts.append(turns[0]["value"])
            if len(texts) >= num * 4:
                break
        random.Random(seed).shuffle(texts)
    else:
        raise ValueError(f"unknown dataset {dataset!r} (mtbench, sharegpt, random)")
    texts = texts[:num]
    out = []
    for t in texts:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True
        )
        out.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return out


def _json_list_rows(text: str):
    """Complete objects of a JSON list, in order, stopping at a truncated tail (the packaged ShareGPT file is cut)."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return
        yield row


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    qs = torch.tensor(values, dtype=torch.float64).quantile(torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64))
    return {"p50": float(qs[0]), "p90": float(qs[1]), "p99": float(qs[2])}


# --- offline --------------------------------------------------------------------------------------------------


def run_offline(engine, prompts, max_tokens: int, progress: bool = True) -> dict:
    """All prompts through the engine (its max_running_requests caps the batch); timings from the engine."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=False)
    done = []
    bar = tqdm(total=len(prompts), desc="requests", disable=not progress, leave=False)
    stamps: dict[str, list[float]] = {}

    def on_output(out):
        stamps.setdefault(out.rid, []).append(time.perf_counter())
        if out.finished:
            done.append(out)
            bar.update(1)

    for i, p in enumerate(prompts):
        engine.submit(p, params, on_output, rid=f"bench-{i}")
    engine.cuda_sync()
    start = time.perf_counter()
    while len(done) < len(prompts):
        engine.step()
    engine.cuda_sync()
    elapsed = time.perf_counter() - start
    bar.close()
    return summarize(done, elapsed, stamps, start)


def summarize(outputs, elapsed, stamps, start) -> dict:
    tokens = sum(o.completion_tokens for o in outputs)
    ttft, itl, tpot, e2e = [], [], [], []
    for o in outputs:
        ts = stamps.get(o.rid, [])
        if ts:
            ttft.append(ts[0] - start)
            e2e.append(ts[-1] - start)
            itl.extend(b - a for a, b in zip(ts, ts[1:]))
            if o.completion_tokens > 1:
                tpot.append((ts[-1] - ts[0]) / (o.completion_tokens - 1))
    result = {
        "requests": len(outputs),
        "output_tokens": tokens,
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "ttft_s": percentiles(ttft),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles(itl),
        "e2e_s": percentiles(e2e),
    }
    specs = [o.spec for o in outputs if o.spec is not None]
    if specs:
        steps = sum(s.num_verify_steps for s in specs)
        acc = sum(s.num_accepted_tokens for s in specs)
        drafted = sum(s.num_draft_tokens for s in specs)
        # None when the run never speculated (adaptive mode decoding plainly throughout)
        result["accept_length"] = (acc + steps) / steps if steps else None
        result["accept_rate"] = acc / drafted if drafted else None
    return result


def hf_generate_baseline(model_path: str | None, prompts, max_tokens: int, device, dtype) -> dict:
    """transformers `generate` (greedy, batch 1) on the same prompts, for reference."""
    from transformers import AutoModelForCausalLM

    from serving.models.loader import parse_dtype, resolve_model_path

    folder, _ = resolve_model_path(model_path)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=parse_dtype(dtype, device)).to(device).eval()
    tokens = 0
    model.generate(torch.tensor([prompts[0]], device=device), max_new_tokens=4, do_sample=False)
    start = time.perf_counter()
    for p in tqdm(prompts, desc="transformers generate", leave=False):
        out = model.generate(torch.tensor([p], device=device), max_new_tokens=max_tokens, do_sample=False)
        tokens += out.shape[1] - len(p)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "requests": len(prompts),
        "output_tokens": tokens,
        "seconds": elapsed,
        "output_tokens_per_s": tokens / elapsed,
    }


def acceptance_per_position(engine) -> list[float] | None:
    m = engine.metrics
    if m is None or engine.spec_worker is None:
        return None
    rates = []
    for d in range(engine.spec_worker.num_steps):
        acc = m.spec_accepted_per_position.labels(str(d))._value.get()
        prop = m.spec_proposed_per_position.labels(str(d))._value.get()
        rates.append(acc / prop if prop else 0.0)
    return rates


# --- online ---------------------------------------------------------------------------------------------------


async def run_online(
    base_url: str,
    model: str,
    prompts,
    max_tokens: int,
    concurrency: int,
    request_rate: float,
    api_key: str | None = None,
    progress: bool = True,
) -> dict:
    import httpx

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    outputs, stamps = [], {}
    bar = tqdm(total=len(prompts), desc=f"online c={concurrency}", leave=False, disable=not progress)
    rng = random.Random(0)

    @dataclasses.dataclass
    class Out:
        rid: str
        completion_tokens: int
        spec: object = None

    async def one(i, prompt, client):
        async with sem:
            body = {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            rid = f"r{i}"
            stamps[rid] = []
            usage, spec = None, None
            async with client.stream("POST", base_url + "/v1/completions", json=body, headers=headers) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        stamps[rid].append(time.perf_counter())
                    usage = chunk.get("usage") or usage
                    spec = chunk.get("spec_decoding") or spec
            from serving.request import SpecStats

            stats = (
                SpecStats(spec["num_verify_steps"], spec["num_draft_tokens"], spec["num_accepted_tokens"])
                if spec
                else None
            )
            outputs.append(Out(rid, (usage or {}).get("completion_tokens", len(stamps[rid])), stats))
            bar.update(1)

    async with httpx.AsyncClient(timeout=600) as client:
        start = time.perf_counter()
        tasks = []
        for i, p in enumerate(prompts):
            tasks.append(asyncio.create_task(one(i, p, client)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    bar.close()
    return summarize(outputs, elapsed, stamps, start)


# --- report ---------------------------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
    header = f"{'system':<26}{'batch':>6}{'tok/s':>10}{'speedup':>9}{'accept':>8}{'TTFT p50':>10}{'ITL p50':>10}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ttft = r.get("ttft_s", {}).get("p50")
        itl = r.get("itl_s", {}).get("p50")
        print(
            f"{r['system']:<26}{r.get('batch', 1):>6}{r['output_tokens_per_s']:>10.1f}"
            f"{(r.get('speedup') or float('nan')):>9.2f}{(r.get('accept_length') or float('nan')):>8.2f}"
            f"{(ttft if ttft is not None else float('nan')):>10.3f}{(itl if itl is not None else float('nan')):>10.4f}"
        )


def plot(results: dict, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    spec = [r for r in results["rows"] if r["system"] == "speculative"]
    if spec:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([r["batch"] for r in spec], [r["speedup"] for r in spec], marker="o")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("speculative / plain tokens/s")
        ax.set_title("Speedup against batch size")
        fig.tight_layout()
        path = folder / "speedup_vs_batch.png"
        fig.savefig(path, dpi=120)
        files.append(str(path))
    acc = results.get("acceptance_per_position")
    if acc:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.bar(range(1, len(acc) + 1), acc)
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance")
        ax.set_ylim(0, 1)
        ax.set_title("Acceptance per draft position")
        fig.tight_layout()
        path = folder / "acceptance_per_position.png"
        fig.savefig(path, dpi=120)
        files.append(str(path))
    return files


# --- commands -------------------------------------------------------------------------------------------------


def _engine(args, speculative: bool, batch: int, target=None, **spec_overrides):
    from serving.engine import Engine

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if hasattr(args, f.name)}
    kw.update(max_running_requests=batch, cuda_graph_max_bs=max(batch, 1))
    if kw.get("max_total_tokens") is None and getattr(args, "kv_tokens_per_request", None):
        # Several engines live in one process: size each KV pool to its batch, not to free GPU memory.
        kw["max_total_tokens"] = batch * args.kv_tokens_per_request
    if not speculative:
        kw.update(speculative=False, speculative_algorithm=None, speculative_draft_model_path=None)
    kw.update(spec_overrides)
    cfg = EngineConfig(**kw)
    if speculative:
        cfg.speculative_max_batch_size = (
            max(cfg.speculative_max_batch_size, batch) if args.always_speculate else cfg.speculative_max_batch_size
        )
    engine = Engine(cfg, target)
    engine.metrics = EngineMetrics(engine.model_name)
    return engine


def _warm_up(engine, prompts, batch: int, max_tokens: int) -> None:
    """Compile and capture outside the timed runs: every prompt's prefill (kernels compile per shape class), a batch
    of short requests, then the draft's CUDA graphs for every batch bucket and prefix width the timed prompts can
    reach (otherwise each is captured inside the first timed iteration that needs it, a fraction of a second each)."""
    run_offline(engine, prompts, 2, progress=False)
    run_offline(engine, prompts[: min(max(4, batch), len(prompts))], 16, progress=False)
    if engine.spec_worker is not None:
        longest = max(len(p) for p in prompts) + max_tokens + engine.spec_worker.num_draft_tokens
        engine.spec_worker.capture_graphs(batch, longest)
    engine.flush_cache()  # the timed runs prefill every prompt


def _median_run(runs: list[dict]) -> dict:
    """The run with the median output tokens/s (the lower middle one for an even count), with every run's rate."""
    ordered = sorted(runs, key=lambda r: r["output_tokens_per_s"])
    return {**ordered[(len(ordered) - 1) // 2], "repeats_output_tokens_per_s": [r["output_tokens_per_s"] for r in runs]}


def cmd_offline(args) -> dict:
    batches = [int(b) for b in args.batch_sizes.split(",")]
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    args.kv_tokens_per_request = 4096
    plain0 = _engine(args, False, 1)
    target = plain0.target
    prompts = load_prompts(args.dataset, args.num_prompts, plain0.tokenizer, random_len=args.random_input_len)
    args.kv_tokens_per_request = max(len(p) for p in prompts) + args.max_tokens + 64
    speculative = bool(args.speculative or args.speculative_draft_model_path)
    rows = []
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "device": _device_name(plain0),
        "rows": rows,
    }
    acceptance = None
    for batch in batches:
        engines = {"plain": _engine(args, False, batch, target)}
        if speculative:
            engines["speculative"] = _engine(args, True, batch, target)
        # The prefix cache is emptied before each timed run so that it prefills every prompt.
        for eng in engines.values():
            _warm_up(eng, prompts, batch, args.max_tokens)
            eng.metrics = EngineMetrics(eng.model_name)  # acceptance figures without the warm-up
        # With --repeats N the systems alternate N times (plain, speculative, plain, ...): a drift of the machine's
        # speed during the run then reaches both alike. Each system reports its median run; the speedup is the
        # median of the paired per-repeat ratios.
        runs: dict[str, list[dict]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, eng in engines.items():
                eng.flush_cache()
                runs[name].append(run_offline(eng, prompts, args.max_tokens, progress=not args.quiet))
        base = _median_run(runs["plain"])
        rows.append({"system": "plain", "batch": batch, **base, "speedup": 1.0})
        if speculative:
            spec = engines["speculative"]
            res = _median_run(runs["speculative"])
            ratios = sorted(s["output_tokens_per_s"] / p["output_tokens_per_s"]
                            for s, p in zip(runs["speculative"], runs["plain"]))  # fmt: skip
            res["speedup"] = ratios[(len(ratios) - 1) // 2]  # the lower middle, as _median_run picks
            res["repeats_speedup"] = ratios
            res["spec_config"] = spec.spec_worker.describe()
            res["acceptance_per_position"] = acceptance_per_position(spec)
            if batch == batches[0]:
                acceptance = res["acceptance_per_position"]
            rows.append({"system": "speculative", "batch": batch, **res})
        del engines
    if args.hf_baseline:
        hf = hf_generate_baseline(args.model, prompts[: args.hf_baseline], args.max_tokens, plain0.device, args.dtype)
        rows.append({"system": "transformers generate", "batch": 1, **hf})
    results["acceptance_per_position"] = acceptance
    return results


def _device_name(engine) -> str:
    if engine.device.type == "cuda":
        return torch.cuda.get_device_name(engine.device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def cmd_online(args) -> dict:
    import httpx
    from transformers import AutoTokenizer

    from serving.models.loader import resolve_model_path

    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.served_model_name or httpx.get(args.base_url + "/v1/models", headers=headers).json()["data"][0]["id"]
    folder, _ = resolve_model_path(args.model) if args.tokenizer is None else (Path(args.tokenizer), None)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    prompts = load_prompts(args.dataset, args.num_prompts, tokenizer, random_len=args.random_input_len)
    rows = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        res = asyncio.run(
            run_online(
                args.base_url,
                model,
                prompts,
                args.max_tokens,
                c,
                args.request_rate,
                args.api_key,
                progress=not args.quiet,
            )
        )
        rows.append({"system": f"online {model}"[:26], "batch": c, **res})
    return {"config": {k: v for k, v in vars(args).items() if k != "func"}, "rows": rows}


def cmd_sweep(args) -> dict:
    """Try (num_steps, topk, num_draft_tokens) candidates at one batch size; write the best into bundle.json."""
    from specbundle.bundle import BundleMetadata, SpeculativeConfig

    args.kv_tokens_per_request = 4096
    plain = _engine(args, False, args.batch_size)
    target = plain.target
    prompts = load_prompts(args.dataset, args.num_prompts, plain.tokenizer)
    _warm_up(plain, prompts, args.batch_size, args.max_tokens)
    base = run_offline(plain, prompts, args.max_tokens, progress=not args.quiet)["output_tokens_per_s"]
    trials = []
    for cand in args.candidates.split(";"):
        steps, topk, ntok = (int(x) for x in cand.split(","))
        eng = _engine(
            args,
            True,
            args.batch_size,
            target,
            speculative_num_steps=steps,
            speculative_eagle_topk=topk,
            speculative_num_draft_tokens=ntok,
        )
        _warm_up(eng, prompts, args.batch_size, args.max_tokens)
        res = run_offline(eng, prompts, args.max_tokens, progress=not args.quiet)
        trials.append(
            {
                "num_steps": steps,
                "eagle_topk": topk,
                "num_draft_tokens": ntok,
                "output_tokens_per_s": res["output_tokens_per_s"],
                "accept_length": res.get("accept_length"),
                "speedup": res["output_tokens_per_s"] / base,
            }
        )
        print(
            f"steps={steps} topk={topk} draft_tokens={ntok}: {res['output_tokens_per_s']:.1f} tok/s "
            f"({trials[-1]['speedup']:.2f}x), accept {(res.get('accept_length') or float('nan')):.2f}"
        )
        draft_path = eng.spec_worker.draft_path
    best = max(trials, key=lambda t: t["output_tokens_per_s"])
    result = {"plain_tokens_per_s": base, "trials": trials, "best": best}
    if args.write_bundle:
        meta = BundleMetadata.from_file(draft_path)
        meta.speculative = SpeculativeConfig(best["num_steps"], best["eagle_topk"], best["num_draft_tokens"])
        meta.save(draft_path)
        result["written_to"] = str(draft_path)
        print(f"recommended config written to {draft_path}/bundle.json")
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="specserve bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    EngineConfig.add_cli_args(p)
    p.add_argument("what", nargs="?", default="run", choices=["run", "sweep"], help="run (default) or sweep")
    p.add_argument("--mode", choices=["offline", "online"], default="offline")
    p.add_argument("--dataset", choices=["mtbench", "sharegpt", "random"], default="mtbench")
    p.add_argument("--num-prompts", type=int, default=80)
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per request")
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--batch-sizes", default="1", help="comma list (offline): max running requests per run")
    p.add_argument("--always-speculate", action="store_true", help="speculate at every batch size in the list")
    p.add_argument("--repeats", type=int, default=1, help="offline: timed runs per system, alternating (median)")
    p.add_argument("--concurrency", default="1", help="comma list (online)")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (online; Poisson)")
    p.add_argument("--base-url", default="http://127.0.0.1:30000", help="online: server address")
    p.add_argument("--tokenizer", default=None, help="online: tokenizer folder (default: from --model)")
    p.add_argument("--hf-baseline", type=int, default=0, help="also time transformers generate on N prompts")
    p.add_argument("--candidates", default="3,1,4;5,1,6;4,2,8;5,4,16;6,8,32", help="sweep: steps,topk,tokens;...")
    p.add_argument("--batch-size", type=int, default=1, help="sweep: batch size")
    p.add_argument("--write-bundle", action="store_true", help="sweep: store the best config in bundle.json")
    p.add_argument("--out", default=None, help="JSON results path")
    p.add_argument("--plot-dir", default=None, help="write PNG plots here")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "sweep":
        results = cmd_sweep(args)
    elif args.mode == "online":
        results = cmd_online(args)
    else:
        results = cmd_offline(args)
    if "rows" in results:
        print_table(results["rows"])
    if args.plot_dir and "rows" in results:
        results["plots"] = plot(results, Path(args.plot_dir))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
