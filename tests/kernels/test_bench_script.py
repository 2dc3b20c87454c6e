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
    args += ["--num-kv-splits", "2", "--copy-mib", "1"] + (["--plot", str(plot)] if with_plot else [])
    proc = _run(args, interpret=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    kernels = [r["kernel"] for r in report["results"]]
    assert kernels == ["decode_attention", "extend_attention (tree verify)"]
    for row in report["results"]:
        assert row["ok"] and row["max_abs_err"] < 1e-2 and row["sdpa_max_abs_err"] < 1e-2
        assert row["time_us"] > 0 and row["bytes"] > 0
    assert report["copy_bandwidth"]["GBps"] > 0
    assert "decode_attention" in proc.stdout and "copy bandwidth" in proc.stdout
    assert plot.exists() == with_plot and (not with_plot or plot.stat().st_size > 1000)
