"""Attention kernel benchmark at Llama-3.1-8B shapes (needs a CUDA GPU).

Measures the device copy bandwidth, then times `decode_attention` (one token per request over a 4096-token paged
prefix) and tree-verify `extend_attention` (64 tree tokens per request under a tree mask, same prefix) in bf16 at
batch 8 and 32, each with the wrapper's own KV-split choice ("auto", the count it picked in brackets) and with a
few explicit split counts, next to torch's scaled_dot_product_attention on K/V already gathered into [B, H, L, D]
with the same mask. Each kernel result is checked against the package's torch reference. Achieved bandwidth counts the
bytes that must move at least once (K/V of the prefix and the new tokens, q, out, slot indices) and is reported
as a share of the copy bandwidth. Every time is the median CUDA-graph replay with L2 flushed before each, for the
kernels and SDPA alike (`bench_ms`; `--flush` says how).

    python benchmarks/bench_kernels.py --out bench_kernels.json

Prints a table, writes JSON, and exits 1 if any case failed its correctness check or raised (2 without a GPU).
`--device cpu` (with TRITON_INTERPRET=1 and tiny shapes) only smoke-tests the script: its timings mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B
BF16_TOL = 2e-2
KV_LAYOUTS = ("slot", "head")
# How the L2 is emptied before each timed replay: "read" sums a 256 MiB buffer (the L2 is left holding clean lines),
# "write" zeroes it (the L2 is left full of dirty lines, up to its 60 MB on an H200, whose write-back to memory then
# happens during the timed call and is charged to it); "none" leaves the previous replay's data in the L2.
FLUSH_MODES = ("read", "write", "none")
FLUSH = "read"


def bench_ms(fn, warmup: int, rep: int, device: str) -> float:
    """Median milliseconds per call. CUDA: `fn` captured once in a CUDA graph and replayed, L2 flushed (`FLUSH`)
    before each replay, so the time is the kernels' alone, as in the engine's graph-replayed decode and verify steps
    (timing eager calls would add the Python launch cost whenever it exceeds the kernels' run time)."""
    if device == "cuda":
        return graph_bench_ms(fn, warmup, rep)
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def graph_bench_ms(fn, warmup_ms: float, rep_ms: float) -> float:
    from serving.cuda_graph_runner import capture_graph

    graph, _ = capture_graph(fn, pool=None)  # as the engine captures: warmed up on a side stream first
    buf = torch.ones(64 << 20, dtype=torch.float32, device="cuda")  # 256 MiB, four times an H200's L2
    flush = {"read": buf.sum, "write": buf.zero_, "none": lambda: None}[FLUSH]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        graph.replay()
    n = min(max(10, int(rep_ms / estimate)), 2000)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush()
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return float(times[n // 2])


def copy_bandwidth(size_bytes: int, warmup: int, rep: int, device: str) -> dict:
    """Timed eagerly: the same copy replayed from a CUDA graph measured 2.76 TB/s on an H200 against 4.2 TB/s eager,
    and the higher figure is the bound to compare kernels with."""
    src = torch.empty(size_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    if device == "cuda":
        import triton.testing

        ms = float(triton.testing.do_bench(lambda: dst.copy_(src), warmup=warmup, rep=rep, return_mode="median"))
    else:
        ms = bench_ms(lambda: dst.copy_(src), warmup, rep, device)
    moved = 2 * src.numel() * src.element_size()  # read + write
    return {"bytes_moved": moved, "time_us": ms * 1e3, "GBps": moved / (ms * 1e-3) / 1e9}


def make_paged_cache(
    batch: int, prefix: int, extra_tokens: int, gen: torch.Generator, dtype: torch.dtype, layout: str = "slot"
):
    """K/V buffers holding `prefix` tokens per request (contiguous slot runs, requests in shuffled order) plus room
    for `extra_tokens` new tokens per request; req_to_token [batch + 3, prefix + extra_tokens].

    The buffers are [num_slots, Hkv, D] views either way. layout "slot" stores them so (one slot's heads side by
    side, the engine's pool); "head" stores [Hkv, num_slots, D], so that one head's keys of a slot run are one
    contiguous range."""
    per_req = prefix + extra_tokens
    num_slots = batch * per_req + 1
    dev = gen.device
    if layout not in KV_LAYOUTS:
        raise ValueError(f"unknown KV layout {layout!r}; expected one of {', '.join(KV_LAYOUTS)}")
    shape = (num_slots, NUM_KV_HEADS, HEAD_DIM) if layout == "slot" else (NUM_KV_HEADS, num_slots, HEAD_DIM)
    k_buffer = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
    v_buffer = torch.randn(shape, generator=gen, device=dev, dtype=dtype)
    if layout == "head":
        k_buffer, v_buffer = k_buffer.transpose(0, 1), v_buffer.transpose(0, 1)
    req_pool_indices = torch.randperm(batch + 3, generator=gen, device=dev)[:batch]
    req_to_token = torch.zeros(batch + 3, per_req, dtype=torch.int32, device=dev)
    order = torch.randperm(batch, generator=gen, device=dev)
    for b in range(batch):
        start = 1 + int(order[b]) * per_req  # slot 0 stays unused, as SGLang's padding slot
        req_to_token[req_pool_indices[b]] = torch.arange(start, start + per_req, dtype=torch.int32, device=dev)
    return k_buffer, v_buffer, req_to_token, req_pool_indices


def gather_kv(buffer, req_to_token, req_pool_indices, length):
    slots = req_to_token[req_pool_indices, :length].long()  # [B, L]
    return buffer[slots].transpose(1, 2).contiguous()  # [B, Hkv, L, D]


def sdpa(q, k, v, mask):
    """q [B, Hq, M, D], k/v [B, Hkv, L, D], mask None or bool [B, 1, M, L]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def auto_decode_splits(batch: int, prefix: int, device: torch.device, dtype: torch.dtype, precise_pv: bool) -> int:
    """The split count decode_attention picks for num_kv_splits=None (same inputs as the wrapper)."""
    from kernels._common import num_sms

    module = importlib.import_module("kernels.decode_attention")  # `kernels` re-exports the function by that name
    block_n = module.decode_block_n(HEAD_DIM, dtype.itemsize, device.type != "cuda")
    per_sm = module.programs_per_sm(dtype, precise_pv)
    return module.choose_num_kv_splits(batch, NUM_KV_HEADS, prefix, block_n, num_sms(device), per_sm)


def auto_extend_splits(batch: int, prefix: int, tree_tokens: int, device: torch.device) -> int:
    """The split count extend_attention picks for num_kv_splits=None (same inputs as the wrapper)."""
    from kernels._common import num_sms

    module = importlib.import_module("kernels.extend_attention")
    group = NUM_Q_HEADS // NUM_KV_HEADS
    _, block_m, block_n = module.block_sizes(group, HEAD_DIM, tree_tokens, device.type != "cuda")
    num_m_blocks = -(-tree_tokens // block_m)
    return module.choose_num_kv_splits(batch, NUM_KV_HEADS, num_m_blocks, prefix, block_n, num_sms(device))


def decode_case(batch: int, prefix: int, gen: torch.Generator, dtype: torch.dtype, layout: str = "slot"):
    """Decode inputs over a paged cache -> (run(num_kv_splits, precise_pv) -> out, fp32-reference output, sdpa() on
    the gathered K/V -> [B, Hq, D], bytes that must move)."""
    from kernels import decode_attention, decode_attention_ref

    dev = gen.device
    k_buffer, v_buffer, req_to_token, req_pool_indices = make_paged_cache(batch, prefix, 0, gen, dtype, layout)
    seq_lens = torch.full((batch,), prefix, dtype=torch.int32, device=dev)
    q = torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, generator=gen, device=dev, dtype=dtype)
    scale = HEAD_DIM**-0.5
    out = torch.empty_like(q)
    ref = decode_attention_ref(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, scale)

    def run(num_kv_splits=None, precise_pv=False):
        """num_kv_splits: None (the wrapper's choice) or a count."""
        decode_attention(
            q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, scale, out=out,
            num_kv_splits=num_kv_splits, max_seq_len_hint=prefix, precise_pv=precise_pv,
        )  # fmt: skip
        return out

    k = gather_kv(k_buffer, req_to_token, req_pool_indices, prefix)
    v = gather_kv(v_buffer, req_to_token, req_pool_indices, prefix)
    q4 = q[:, :, None, :]  # [B, Hq, 1, D]
    elt = q.element_size()
    nbytes = 2 * batch * prefix * NUM_KV_HEADS * HEAD_DIM * elt + 2 * q.numel() * elt + batch * prefix * 4
    return run, ref, (lambda: sdpa(q4, k, v, None)[:, :, 0]), nbytes


def bench_decode(batch, prefix, num_kv_splits, warmup, rep, gen, dtype, precise_pv=False, layout="slot") -> dict:
    """num_kv_splits None: the wrapper's own choice (reported as the count it picks)."""
    dev = gen.device
    run, ref, run_sdpa, nbytes = decode_case(batch, prefix, gen, dtype, layout)
    err = (run(num_kv_splits, precise_pv).float() - ref.float()).abs().max().item()
    ms = bench_ms(lambda: run(num_kv_splits, precise_pv), warmup, rep, dev.type)
    sdpa_err = (run_sdpa().float() - ref.float()).abs().max().item()
    sdpa_ms = bench_ms(run_sdpa, warmup, rep, dev.type)
    return {
        "kernel": "decode_attention",
        "precise_pv": precise_pv,
        "kv_layout": layout,
        "batch": batch,
        "prefix": prefix,
        "query_tokens": 1,
        "auto_splits": num_kv_splits is None,
        "num_kv_splits": num_kv_splits or auto_decode_splits(batch, prefix, dev, dtype, precise_pv),
        "bytes": nbytes,
        "time_us": ms * 1e3,
        "GBps": nbytes / (ms * 1e-3) / 1e9,
        "max_abs_err": err,
        "ok": err <= BF16_TOL,
        "sdpa_time_us": sdpa_ms * 1e3,
        "sdpa_GBps": nbytes / (sdpa_ms * 1e-3) / 1e9,
        "sdpa_max_abs_err": sdpa_err,
    }


def random_tree_mask(batch, num_nodes, gen) -> torch.Tensor:
    """bool [B, N, N]: node i's parent is a random earlier node; i sees itself and its ancestors."""
    parents = [
        [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, num_nodes)] for _ in range(batch)
    ]
    mask = torch.zeros(batch, num_nodes, num_nodes, dtype=torch.bool)
    for b in range(batch):
        for i in range(num_nodes):
            mask[b, i, i] = True
            if i > 0:
                mask[b, i] |= mask[b, parents[b][i]]
    return mask


def tree_case(
    batch: int, prefix: int, tree_tokens: int, gen: torch.Generator, dtype: torch.dtype, layout: str = "slot"
):
    """Tree-verify inputs (tree_tokens per request under a random tree mask, over a paged prefix) -> (run(num_kv_splits,
    precise_pv) -> out, fp32-reference output, sdpa() on the gathered K/V -> [N, Hq, D], bytes that must move)."""
    from kernels import extend_attention, extend_attention_ref

    dev = gen.device
    cache = make_paged_cache(batch, prefix, tree_tokens, gen, dtype, layout)
    k_buffer, v_buffer, req_to_token, req_pool_indices = cache
    num_tokens = batch * tree_tokens
    q = torch.randn(num_tokens, NUM_Q_HEADS, HEAD_DIM, generator=gen, device=dev, dtype=dtype)
    k_new = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=dev, dtype=dtype)
    v_new = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device=dev, dtype=dtype)
    prefix_lens = torch.full((batch,), prefix, dtype=torch.int32, device=dev)
    extend_lens = torch.full((batch,), tree_tokens, dtype=torch.int32, device=dev)
    extend_start_loc = torch.arange(batch, dtype=torch.int32, device=dev) * tree_tokens
    tree_mask = random_tree_mask(batch, tree_tokens, torch.Generator().manual_seed(0)).to(dev)
    out = torch.empty_like(q)
    args = (
        q, k_new, v_new, k_buffer, v_buffer, req_to_token, req_pool_indices, prefix_lens, extend_lens,
        extend_start_loc, tree_tokens, HEAD_DIM**-0.5,
    )  # fmt: skip
    ref = extend_attention_ref(*args, custom_mask=tree_mask)

    def run(num_kv_splits=None, precise_pv=False):
        extend_attention(
            *args, custom_mask=tree_mask, out=out, num_kv_splits=num_kv_splits, max_prefix_len_hint=prefix,
            precise_pv=precise_pv,
        )  # fmt: skip
        return out

    # SDPA on gathered K/V: [B, Hkv, prefix + tree, D], mask [B, 1, tree, prefix + tree].
    to_bhld = lambda t: t.view(batch, tree_tokens, -1, HEAD_DIM).transpose(1, 2)  # noqa: E731
    k_all = torch.cat([gather_kv(k_buffer, req_to_token, req_pool_indices, prefix), to_bhld(k_new)], 2).contiguous()
    v_all = torch.cat([gather_kv(v_buffer, req_to_token, req_pool_indices, prefix), to_bhld(v_new)], 2).contiguous()
    q4 = to_bhld(q).contiguous()  # [B, Hq, tree, D]
    full_mask = torch.cat([torch.ones(batch, tree_tokens, prefix, dtype=torch.bool, device=dev), tree_mask], dim=2)[
        :, None
    ]  # [B, 1, tree, prefix + tree]

    def run_sdpa():
        return sdpa(q4, k_all, v_all, full_mask).transpose(1, 2).reshape(num_tokens, NUM_Q_HEADS, HEAD_DIM)

    elt = q.element_size()
    kv_bytes = 2 * batch * (prefix + tree_tokens) * NUM_KV_HEADS * HEAD_DIM * elt
    nbytes = kv_bytes + 2 * q.numel() * elt + batch * prefix * 4 + tree_mask.numel()
    return run, ref, run_sdpa, nbytes


def bench_tree_verify(
    batch, prefix, tree_tokens, num_kv_splits, warmup, rep, gen, dtype, precise_pv=False, layout="slot"
) -> dict:
    """num_kv_splits None: the wrapper's own choice (reported as the count it picks)."""
    dev = gen.device
    run, ref, run_sdpa, nbytes = tree_case(batch, prefix, tree_tokens, gen, dtype, layout)
    err = (run(num_kv_splits, precise_pv).float() - ref.float()).abs().max().item()
    ms = bench_ms(lambda: run(num_kv_splits, precise_pv), warmup, rep, dev.type)
    sdpa_err = (run_sdpa().float() - ref.float()).abs().max().item()
    sdpa_ms = bench_ms(run_sdpa, warmup, rep, dev.type)
    return {
        "kernel": "extend_attention (tree verify)",
        "precise_pv": precise_pv,
        "kv_layout": layout,
        "batch": batch,
        "prefix": prefix,
        "query_tokens": tree_tokens,
        "auto_splits": num_kv_splits is None,
        "num_kv_splits": (
            auto_extend_splits(batch, prefix, tree_tokens, dev) if num_kv_splits is None else num_kv_splits
        ),
        "bytes": nbytes,
        "time_us": ms * 1e3,
        "GBps": nbytes / (ms * 1e-3) / 1e9,
        "max_abs_err": err,
        "ok": err <= BF16_TOL,
        "sdpa_time_us": sdpa_ms * 1e3,
        "sdpa_GBps": nbytes / (sdpa_ms * 1e-3) / 1e9,
        "sdpa_max_abs_err": sdpa_err,
    }


def print_table(copy: dict, rows: list[dict]) -> None:
    print(f"\ncopy bandwidth: {copy['GBps']:.0f} GB/s; L2 flush before each replay: {FLUSH}\n")
    header = (
        f"{'kernel':<32}{'P.V':>8}{'KV':>6}{'B':>4}{'splits':>10}{'us':>10}{'GB/s':>8}{'%copy':>7}"
        f"{'sdpa us':>10}{'sdpa %':>8}{'speedup':>9}{'max err':>10}  ok"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<32}{r['batch']:>4}  ERROR: {r['error']}")
            continue
        splits = f"auto({r['num_kv_splits']})" if r.get("auto_splits") else str(r["num_kv_splits"])
        print(
            f"{r['kernel']:<32}{'precise' if r['precise_pv'] else 'bf16':>8}{r.get('kv_layout', 'slot'):>6}"
            f"{r['batch']:>4}{splits:>10}"
            f"{r['time_us']:>10.1f}{r['GBps']:>8.0f}"
            f"{r['pct_of_copy']:>7.1f}{r['sdpa_time_us']:>10.1f}{r['sdpa_pct_of_copy']:>8.1f}"
            f"{r['speedup_vs_sdpa']:>9.2f}{r['max_abs_err']:>10.2e}  {'yes' if r['ok'] else 'NO'}"
        )


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "error" not in r]
    labels = [
        f"{'decode' if r['query_tokens'] == 1 else 'tree verify'}\nB={r['batch']}"
        + (f" s=auto({r['num_kv_splits']})" if r.get("auto_splits") else f" s={r['num_kv_splits']}")
        for r in done
    ]
    x = range(len(done))
    fig, ax = plt.subplots(figsize=(1.6 * len(done) + 2, 4))
    ax.bar([i - 0.2 for i in x], [r["pct_of_copy"] for r in done], width=0.4, label="triton kernel")
    ax.bar([i + 0.2 for i in x], [r["sdpa_pct_of_copy"] for r in done], width=0.4, label="SDPA (gathered K/V)")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("achieved bandwidth, % of copy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    global FLUSH
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_kernels.json", help="JSON output path")
    parser.add_argument("--batch-sizes", default="8,32")
    parser.add_argument("--prefix", type=int, default=4096)
    parser.add_argument("--tree-tokens", type=int, default=64)
    parser.add_argument(
        "--num-kv-splits",
        default="auto,1,2,8",
        help="decode split counts to time, comma-separated (auto: the default)",
    )
    parser.add_argument(
        "--extend-kv-splits", default="auto,1,8", help="tree-verify prefix split counts to time (auto: the default)"
    )
    parser.add_argument(
        "--pv", default="bf16,precise", help="P.V variants: bf16 (the default) and/or precise (split probabilities)"
    )
    parser.add_argument(
        "--kv-layout",
        default="slot",
        help="KV buffer layouts to time, comma-separated: slot ([num_slots, Hkv, D], the engine's pool) and/or head "
        "([Hkv, num_slots, D] storage under the same view)",
    )
    parser.add_argument(
        "--flush",
        default=FLUSH,
        choices=FLUSH_MODES,
        help="how the L2 is emptied before each timed replay: read a 256 MiB buffer (default), or zero it, which "
        "leaves dirty lines whose write-back is then timed with the kernel; none: not emptied",
    )
    parser.add_argument("--copy-mib", type=int, default=1024, help="buffer size of the copy-bandwidth probe")
    parser.add_argument("--warmup", type=int, default=25, help="ms of warm-up per measurement (do_bench)")
    parser.add_argument("--rep", type=int, default=100, help="ms of repetitions per measurement (do_bench)")
    parser.add_argument("--plot", default=None, help="also write a PNG bar chart here (needs matplotlib)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: script smoke test only")
    args = parser.parse_args(argv)

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
        return 2
    if args.device == "cuda" and interpret:
        print("TRITON_INTERPRET=1 would run the kernels in the CPU interpreter; unset it to benchmark.")
        return 2
    if args.device == "cpu" and not interpret:
        print("--device cpu needs TRITON_INTERPRET=1 (set before start-up).")
        return 2
    import triton

    FLUSH = args.flush
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]

    def parse_splits(text: str) -> list[int | None]:
        out = []
        for s in (s for s in text.split(",") if s):
            if s == "auto":
                out.append(None)
            elif s.isdigit() and int(s) > 0:
                out.append(int(s))
            else:
                parser.error(f"unknown split count {s!r}: expected auto or a count")
        return out

    decode_splits = parse_splits(args.num_kv_splits)
    extend_splits = parse_splits(args.extend_kv_splits)
    gen = torch.Generator(device=args.device).manual_seed(0)
    # bf16 on the GPU; the interpreter mis-computes bf16 dots, so the CPU smoke test uses fp16.
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float16

    copy = copy_bandwidth(args.copy_mib << 20, args.warmup, args.rep, args.device)
    rows: list[dict] = []
    pvs = [v == "precise" for v in args.pv.split(",") if v]
    layouts = [v for v in args.kv_layout.split(",") if v]
    for layout in layouts:
        if layout not in KV_LAYOUTS:
            parser.error(f"--kv-layout: unknown layout {layout!r}; expected {', '.join(KV_LAYOUTS)}")
    cases = [
        ("decode_attention", b, s, pv, kl) for kl in layouts for pv in pvs for b in batch_sizes for s in decode_splits
    ]
    cases += [
        ("extend_attention (tree verify)", b, s, pv, kl)
        for kl in layouts for pv in pvs for b in batch_sizes for s in extend_splits
    ]  # fmt: skip
    for name, batch, splits, pv, layout in cases:
        try:
            if name == "decode_attention":
                row = bench_decode(batch, args.prefix, splits, args.warmup, args.rep, gen, dtype, pv, layout)
            else:
                row = bench_tree_verify(
                    batch, args.prefix, args.tree_tokens, splits, args.warmup, args.rep, gen, dtype, pv, layout
                )
            row["pct_of_copy"] = 100 * row["GBps"] / copy["GBps"]
            row["sdpa_pct_of_copy"] = 100 * row["sdpa_GBps"] / copy["GBps"]
            row["speedup_vs_sdpa"] = row["sdpa_time_us"] / row["time_us"]
        except Exception as e:  # one broken case must not lose the others' numbers
            traceback.print_exc()
            row = {
                "kernel": name, "precise_pv": pv, "kv_layout": layout, "batch": batch, "num_kv_splits": splits,
                "error": f"{type(e).__name__}: {e}",
            }  # fmt: skip
        finally:
            if args.device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)

    report = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "shapes": {
            "num_q_heads": NUM_Q_HEADS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_dim": HEAD_DIM,
            "prefix": args.prefix,
            "tree_tokens": args.tree_tokens,
            "dtype": str(dtype).removeprefix("torch."),
        },
        "copy_bandwidth": copy,
        "l2_flush": FLUSH,
        "results": rows,
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print_table(copy, rows)
    print(f"\nwrote {out_path}")
    if args.plot:
        plot(rows, Path(args.plot))
        print(f"wrote {args.plot}")
    failed = [r for r in rows if "error" in r or not r.get("ok", False)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
