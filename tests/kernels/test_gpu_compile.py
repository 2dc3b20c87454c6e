import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_gpu_paths_compile_for_sm90():
    """The CPU tests only run the interpreter branches; this compiles the CUDA branches (to cubin, via the ptxas
    that ships with triton) so that a GPU-only syntax or type error fails here, not on the H200."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.compile_for_gpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("OK ") >= 12 and "FAIL" not in proc.stdout
