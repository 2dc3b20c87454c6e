"""Two-process torchrun (gloo, CPU, FSDP2) against one process on the same global batch."""

import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tests.specforge.test_train import make_dataset, make_target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(target, data, out, nproc: int, batch: int):
    args = ["train", "--target-model-path", str(target), "--data-path", str(data), "--output-dir", str(out),
            "--batch-size", str(batch), "--max-length", "32", "--draft-vocab-size", "128", "--ttt-length", "3",
            "--learning-rate", "3e-3", "--report-to", "none", "--num-epochs", "1", "--max-num-steps", "4",
            "--eval-holdout", "6", "--eval-interval", "2", "--save-interval", "2", "--warmup-ratio", "0.2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    if nproc == 1:
        cmd = [sys.executable, "-m", "specforge.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()),
               "-m", "specforge.cli", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def test_two_ranks_fsdp_equal_one_rank(tmp_path):
    target, data = make_target(tmp_path / "target"), make_dataset(tmp_path / "data", n=24)
    _train(target, data, tmp_path / "one", nproc=1, batch=4)
    _train(target, data, tmp_path / "two", nproc=2, batch=2)
    for step in (2, 4):
        name = f"epoch_0_step_{step}/training_state/draft_fp32.safetensors"
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"step {step}: {key}")
    # both ranks wrote their RNG state; only rank 0 wrote the rest
    state = tmp_path / "two" / "epoch_0_step_4" / "training_state"
    assert (state / "rng_rank0.safetensors").is_file() and (state / "rng_rank1.safetensors").is_file()
    evals_one = [line for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    evals_two = [line for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals_one) == len(evals_two) == 2
