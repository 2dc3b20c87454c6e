"""Two-process torchrun (gloo, CPU, FSDP2) against one process on the same global batch."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.specforge.test_train import make_dataset, make_target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(target, data, out, nproc: int, batch: int, *extra: str):
    args = ["train", "--target-model-path", str(target), "--data-path", str(data), "--output-dir", str(out),
            "--batch-size", str(batch), "--max-length", "32", "--draft-vocab-size", "128", "--ttt-length", "3",
            "--learning-rate", "3e-3", "--report-to", "none", "--num-epochs", "1", "--max-num-steps", "4",
            "--eval-holdout", "6", "--eval-interval", "2", "--save-interval", "2", "--warmup-ratio", "0.2",
            "--dtype", "float32", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    if nproc == 1:
        cmd = [sys.executable, "-m", "specforge.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "specforge.cli", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
        out, err = proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-6000:]


def _master(out, step):
    return load_file(str(out / f"epoch_0_step_{step}" / "training_state" / "draft_fp32.safetensors"))


def _assert_same(a, b, what):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{what}: {key}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    target, data = make_target(root / "target"), make_dataset(root / "data", n=24)
    _train(target, data, root / "one", 1, 4)
    _train(target, data, root / "two", 2, 2)
    return {"root": root, "target": target, "data": data}


def test_two_ranks_fsdp_equal_one_rank(runs):
    one, two = runs["root"] / "one", runs["root"] / "two"
    for step in (2, 4):
        _assert_same(_master(one, step), _master(two, step), f"step {step}")
    # both ranks wrote their RNG state; only rank 0 wrote the rest
    state = two / "epoch_0_step_4" / "training_state"
    assert (state / "rng_rank0.safetensors").is_file() and (state / "rng_rank1.safetensors").is_file()
    evals_one = [line for line in (one / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    evals_two = [line for line in (two / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals_one) == len(evals_two) == 2
    acc_one = [a for line in evals_one for a in json.loads(line)["acc"]]
    acc_two = [a for line in evals_two for a in json.loads(line)["acc"]]
    assert acc_one == pytest.approx(acc_two, abs=1e-6)  # eval shards over ranks without dropping or doubling rows


def test_deepspeed_zero2_matches_fsdp_and_resumes(runs):
    pytest.importorskip("deepspeed")
    out = runs["root"] / "ds"
    _train(runs["target"], runs["data"], out, 2, 2, "--strategy", "deepspeed", "--max-num-steps", "2")
    _train(runs["target"], runs["data"], out, 2, 2, "--strategy", "deepspeed", "--resume")
    _assert_same(_master(runs["root"] / "two", 4), _master(out, 4), "deepspeed vs fsdp, step 4")


def test_sigterm_stops_both_ranks_after_the_same_step_with_a_checkpoint(runs):
    """torchrun passes a SIGTERM on to its workers: both ranks agree on the step to stop after, save it together,
    and leave a checkpoint that --resume continues from."""
    import time

    out = runs["root"] / "sigterm"
    args = ["train", "--target-model-path", str(runs["target"]), "--data-path", str(runs["data"]), "--output-dir",
            str(out), "--batch-size", "2", "--max-length", "32", "--draft-vocab-size", "128", "--ttt-length", "3",
            "--report-to", "none", "--num-epochs", "200", "--save-interval", "100000", "--log-interval", "1",
            "--dtype", "float32"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "specforge.cli", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"train"') >= 3:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        raise AssertionError("torchrun did not stop after SIGTERM:\n" + log[-4000:]) from None
    assert proc.returncode != 0 and "SIGTERM: stopped after step" in log, log[-4000:]
    step = json.loads([line for line in metrics.read_text().splitlines() if '"train"' in line][-1])["step"]
    latest = (out / "latest").read_text().strip()
    assert latest.endswith(f"_step_{step}")
    state = out / latest / "training_state"
    assert json.loads((state / "trainer_state.json").read_text())["global_step"] == step
    assert (state / "rng_rank0.safetensors").is_file() and (state / "rng_rank1.safetensors").is_file()
