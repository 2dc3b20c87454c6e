import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "bench_kernels.py"


def _run(args, interpret: bool):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only exit")
def test_bench_exits_clearly_without_gpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run(["--out", str(out)], interpret=False)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stdout
    assert not out.exists()


def test_bench_smoke_on_cpu_writes_checked_results(tmp_path):
    """Tiny shapes through the interpreter: every case runs, matches its reference, and lands in the JSON."""
    out = tmp_path / "sub" / "bench.json"
    args = ["--device", "cpu", "--out", str(out), "--batch-sizes", "2", "--prefix", "19", "--tree-tokens", "5"]
    plot = tmp_path / "bench.png"
    with_plot = importlib.util.find_spec("matplotlib") is not None
    args += ["--num-kv-splits", "auto,2", "--extend-kv-splits", "auto,2", "--copy-mib", "1"]
    args += ["--plot", str(plot)] if with_plot else []
    proc = _run(args, interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    cases = [(r["kernel"], r["precise_pv"], r["auto_splits"], r["num_kv_splits"]) for r in report["results"]]
    # auto: the wrappers' choice at B=2, 8 KV heads, 19 keys (two blocks) on CPU (4 nominal SMs): decode takes 2
    # splits with bf16 P.V (three programs per SM) and 1 with the precise one (two per SM); tree verify 1.
    # Both P.V variants by default, bf16 (the kernels' default) first.
    auto_splits = {("decode_attention", False): 2, ("decode_attention", True): 1}
    assert cases == [
        (kernel, pv, auto, splits if not auto else auto_splits.get((kernel, pv), 1))
        for kernel in ("decode_attention", "extend_attention (tree verify)")
        for pv in (False, True)
        for auto, splits in ((True, None), (False, 2))
    ]
    for row in report["results"]:
        assert row["ok"] and row["max_abs_err"] < 1e-2 and row["sdpa_max_abs_err"] < 1e-2
        assert row["time_us"] > 0 and row["bytes"] > 0
    assert report["copy_bandwidth"]["GBps"] > 0
    assert "decode_attention" in proc.stdout and "copy bandwidth" in proc.stdout
    assert plot.exists() == with_plot and (not with_plot or plot.stat().st_size > 1000)


def test_bench_times_both_kv_layouts_and_rejects_unknown(tmp_path):
    """--kv-layout slot,head: the same cases over [num_slots, Hkv, D] storage and over [Hkv, num_slots, D] storage
    seen through the same view; both match the reference. An unknown layout is refused by name."""
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--out", str(out), "--batch-sizes", "2", "--prefix", "19", "--tree-tokens", "5"]
    args += ["--num-kv-splits", "2", "--extend-kv-splits", "auto", "--pv", "precise", "--copy-mib", "1"]
    proc = _run([*args, "--kv-layout", "slot,head"], interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(r["kernel"], r["kv_layout"]) for r in rows] == [
        ("decode_attention", "slot"), ("decode_attention", "head"),
        ("extend_attention (tree verify)", "slot"), ("extend_attention (tree verify)", "head"),
    ]  # fmt: skip
    assert all(r["ok"] and r["max_abs_err"] < 1e-2 for r in rows)
    bad = _run([*args, "--kv-layout", "slot,diagonal"], interpret=True)
    assert bad.returncode == 2 and "unknown layout 'diagonal'" in bad.stderr


def test_bench_rejects_unknown_split_counts(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--out", str(out), "--batch-sizes", "2", "--prefix", "19", "--tree-tokens", "5"]
    args += ["--extend-kv-splits", "auto", "--pv", "bf16", "--copy-mib", "1"]
    bad = _run([*args, "--num-kv-splits", "2,sideways"], interpret=True)
    assert bad.returncode == 2 and "unknown split count 'sideways'" in bad.stderr
    assert not out.exists()


def test_tune_script_smoke_on_cpu(tmp_path):
    """The launch sweep's code path on tiny shapes through the interpreter: one configuration per kernel is timed
    and checked against its reference, then timed again, and everything lands in the JSON."""
    out = tmp_path / "tune.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    args = ["--device", "cpu", "--out", str(out), "--batch-sizes", "2", "--prefix", "19", "--tree-tokens", "5"]
    args += ["--seconds", "0", "--recheck", "1", "--decode-grid", "64/4/2/2"]
    script = REPO / "benchmarks" / "tune_attention.py"
    proc = subprocess.run(
        [sys.executable, str(script), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert [(r["kernel"], r["batch"]) for r in report["results"]] == [("decode", 2), ("tree", 2)]
    assert all(r["max_abs_err"] < 1e-2 and r["time_us"] > 0 for r in report["results"])
    assert [r["kernel"] for r in report["rechecks"]] == ["decode", "tree"]
    assert all(len(r["again_us"]) == 2 and all(t > 0 for t in r["again_us"]) for r in report["rechecks"])
    assert "decode b2" in proc.stdout and "tree b2" in proc.stdout
