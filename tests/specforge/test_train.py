"""End-to-end training on CPU with a tiny random Llama target: online, offline, checkpoints, resume, errors."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from specbundle.checkpoint import load_draft
from specbundle.config import DraftConfigError
from specforge.cli import main
from specforge.hidden_states import HiddenStatesError
from specforge.train_state import CheckpointError

VOCAB = 256


def make_target(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # a confident target, so there is a distribution worth imitating
    model.save_pretrained(folder)
    return folder


def make_dataset(folder: Path, n: int = 40, seed: int = 1, bad_row: bool = False) -> Path:
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(24, 40, (1,), generator=g))
        start, step = int(torch.randint(0, 200, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        rows.append({"input_ids": [(start + step * k) % 200 for k in range(length)],
                     "loss_mask": [0] * 4 + [1] * (length - 4)})
    if bad_row:
        rows[3]["loss_mask"] = rows[3]["loss_mask"][:-2]
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids OpenMP barrier stalls when the shared cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sf")
    return {"root": root, "target": make_target(root / "target"), "data": make_dataset(root / "data")}


def common(assets, out, *extra):
    return ["train", "--target-model-path", str(assets["target"]), "--output-dir", str(out),
            "--batch-size", "4", "--max-length", "32", "--draft-vocab-size", "128", "--ttt-length", "3",
            "--learning-rate", "3e-3", "--report-to", "none", "--log-interval", "1", *extra]


def metrics(out: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == split]


def master(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "training_state" / "draft_fp32.safetensors"))


def test_online_training_learns_and_saves_an_sglang_draft(assets):
    out = assets["root"] / "online"
    seen = make_dataset(assets["root"] / "seen", n=16)  # the first 16 training rows: is the data being fitted?
    assert main(common(assets, out, "--data-path", str(assets["data"]), "--eval-data-path", str(seen),
                       "--num-epochs", "3", "--eval-interval", "10", "--save-interval", "15")) == 0
    evals = metrics(out, "eval")
    assert [e["step"] for e in evals] == [10, 20, 30]
    assert evals[0]["loss"] > evals[1]["loss"] > evals[2]["loss"]
    assert evals[-1]["loss"] < 0.93 * evals[0]["loss"]
    assert evals[-1]["acc"][0] > evals[0]["acc"][0]
    assert evals[-1]["accept_length"] > evals[0]["accept_length"] > 1.0
    train = metrics(out, "train")
    assert len(train) == 30 and train[0]["lr"] > 0 and len(train[0]["acc"]) == 3
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] for r in train)
    assert train[-1]["train_seconds"] > train[0]["train_seconds"] > 0

    ckpts = sorted(p.name for p in out.glob("epoch_*_step_*"))
    assert ckpts == ["epoch_1_step_15", "epoch_2_step_30"]
    assert (out / "latest").read_text().strip() == "epoch_2_step_30"
    ckpt = out / "epoch_2_step_30"
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 1, 0]  # [1, N//2-1, N-4] for N=4
    assert cfg["draft_vocab_size"] == 128 and cfg["vocab_size"] == VOCAB and cfg["num_hidden_layers"] == 1
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        assert {"d2t", "t2d", "fc.weight", "lm_head.weight"} <= set(f.keys())
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16
    draft = load_draft(ckpt, target_hidden_size=64, target_vocab_size=VOCAB)
    assert int(draft.t2d.sum()) == 128
    assert torch.equal(draft.draft_to_target(torch.arange(128)), draft.t2d.nonzero().squeeze(1))
    fp32 = master(ckpt)
    torch.testing.assert_close(draft.fc.weight, fp32["fc.weight"].bfloat16().float())
    assert not any(p.name.endswith(".pt") for p in ckpt.rglob("*"))  # no pickles anywhere


@pytest.mark.parametrize("grouped", [False, True])
def test_resume_after_stop_matches_unbroken_run(assets, grouped):
    base = ["--data-path", str(assets["data"]), "--num-epochs", "2", "--save-interval", "100",
            "--draft-accumulation-steps", "2", "--batch-size", "2", "--seed", "3"]
    base += ["--group-by-length"] if grouped else []
    full, broken = assets["root"] / f"full{grouped}", assets["root"] / f"broken{grouped}"
    assert main(common(assets, full, *base)) == 0  # 40 rows / (2 x 2) = 10 optimizer steps per epoch
    assert main(common(assets, broken, *base, "--max-num-steps", "13")) == 0  # stops mid epoch 1
    state = json.loads((broken / "epoch_1_step_13" / "training_state" / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["micro_in_epoch"]) == (13, 1, 6)
    assert main(common(assets, broken, *base, "--resume")) == 0
    a, b = master(full / "epoch_1_step_20"), master(broken / "epoch_1_step_20")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    opt_a = load_file(str(full / "epoch_1_step_20" / "training_state" / "optimizer.safetensors"))
    opt_b = load_file(str(broken / "epoch_1_step_20" / "training_state" / "optimizer.safetensors"))
    for key in opt_a:
        torch.testing.assert_close(opt_a[key], opt_b[key], rtol=0, atol=0, msg=key)
    lr_a = [r["lr"] for r in metrics(full, "train")]
    lr_b = [r["lr"] for r in metrics(broken, "train")]
    assert lr_a == lr_b


def test_length_grouped_batches_pad_less_and_keep_every_row_once():
    from specforge.trainer import epoch_batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 2000, (3000,), generator=g).tolist()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    plain = epoch_batches(3000, 16, seed=0, epoch=0)
    grouped = epoch_batches(3000, 16, seed=0, epoch=0, lengths=lengths)
    assert len(grouped) == len(plain) == 187 and all(len(b) == 16 for b in grouped)
    flat = [i for b in grouped for i in b]
    assert len(set(flat)) == len(flat) == 187 * 16
    assert padding(grouped) < 0.05 * padding(plain)
    assert grouped == epoch_batches(3000, 16, seed=0, epoch=0, lengths=lengths)  # deterministic: resumable
    assert grouped != epoch_batches(3000, 16, seed=0, epoch=1, lengths=lengths)
    order = [max(lengths[i] for i in b) for b in grouped]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # batches in random order


def test_train_throughput_script_times_every_case(assets, tmp_path):
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "train_throughput.py"
    spec = importlib.util.spec_from_file_location("train_throughput", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "tp.json"
    flags = common(assets, tmp_path / "o", "--data-path", str(assets["data"]))[1:]  # without the "train" command
    assert module.main(["--steps", "2", "--warmup", "1", "--phases", "--out", str(out), *flags]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["fused_attention"], r["group_by_length"]) for r in rows] == [
        (False, False), (False, True), (True, False), (True, True)]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"] for r in rows)
    for r in rows:
        assert set(r["phase_ms"]) == {"collate", "target", "draft_forward", "backward", "optimizer"}
        assert all(v > 0 for v in r["phase_ms"].values()) and sum(r["phase_ms"].values()) <= r["ms_per_step"]
    with pytest.raises(SystemExit, match="batches in an epoch"):
        module.main(["--steps", "50", *flags])


def test_sigterm_saves_a_checkpoint_that_resume_continues(assets, tmp_path):
    """A scheduler's SIGTERM mid-run: the step in flight finishes, a checkpoint is saved, the process exits 143, and
    --resume carries on from that step."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    flags = common(assets, out, "--data-path", str(assets["data"]), "--num-epochs", "100", "--save-interval", "1000")
    proc = subprocess.Popen([sys.executable, "-m", "specforge.cli", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(metrics(out, "train")) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, log
    step = metrics(out, "train")[-1]["step"]
    assert 3 <= step < 1000 and "SIGTERM: stopped after step" in log
    latest = (out / "latest").read_text().strip()
    state = json.loads((out / latest / "training_state" / "trainer_state.json").read_text())
    assert state["global_step"] == step and latest.endswith(f"_step_{step}")
    assert main(common(assets, out, "--data-path", str(assets["data"]), "--num-epochs", "100", "--resume",
                       "--max-num-steps", str(step + 2))) == 0
    assert [r["step"] for r in metrics(out, "train")][-2:] == [step + 1, step + 2]


def test_offline_training_matches_online(assets):
    hs = assets["root"] / "hidden"
    assert main(["prepare-hidden-states", "--target-model-path", str(assets["target"]), "--data-path",
                 str(assets["data"]), "--output-dir", str(hs), "--max-length", "32", "--batch-size", "3",
                 "--shard-size", "16", "--storage-dtype", "float32"]) == 0
    meta = json.loads((hs / "meta.json").read_text())
    assert meta["num_samples"] == 40 and len(meta["shards"]) == 3 and meta["aux_layer_ids"] == [1, 1, 0]
    args = ["--num-epochs", "1", "--max-num-steps", "4", "--save-interval", "100"]

    def online_and_offline(name, extra, rtol, atol):
        on, off = assets["root"] / f"cmp_online{name}", assets["root"] / f"cmp_offline{name}"
        assert main(common(assets, on, "--data-path", str(assets["data"]), *args, *extra)) == 0
        assert main(common(assets, off, "--train-hidden-states-path", str(hs), *args, *extra)) == 0
        a, b = master(on / "epoch_0_step_4"), master(off / "epoch_0_step_4")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)
        assert torch.equal(a["t2d"], b["t2d"])
        return a

    a = online_and_offline("", [], 1e-4, 1e-5)
    # answers capped at 5 tokens a turn: the offline rows are cut the same way. The online target then runs on the
    # cut rows while the stored states came from whole rows, so the last bits differ (about 3e-5 after 4 steps).
    a5 = online_and_offline("5", ["--max-answer-tokens", "5"], 1e-3, 2e-4)
    assert not torch.equal(a5["t2d"], a["t2d"])  # the vocabulary counts the capped answers only
    # bf16 storage (the default) also trains
    hs16 = assets["root"] / "hidden16"
    assert main(["prepare-hidden-states", "--target-model-path", str(assets["target"]), "--data-path",
                 str(assets["data"]), "--output-dir", str(hs16), "--max-length", "32"]) == 0
    out16 = assets["root"] / "offline16"
    assert main(common(assets, out16, "--train-hidden-states-path", str(hs16), "--num-epochs", "1",
                       "--eval-holdout", "8")) == 0
    load_draft(out16 / (out16 / "latest").read_text().strip())


def test_bad_inputs_fail_with_clear_errors(assets, tmp_path):
    bad = make_dataset(tmp_path / "bad", n=8, bad_row=True)
    with pytest.raises(ValueError, match="row 3"):
        main(common(assets, tmp_path / "o1", "--data-path", str(bad), "--num-epochs", "1"))
    wrong = tmp_path / "draft.json"
    wrong.write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
                                 "vocab_size": 1000, "draft_vocab_size": 128}))
    with pytest.raises(DraftConfigError, match="vocab_size"):
        main(common(assets, tmp_path / "o2", "--data-path", str(assets["data"]), "--draft-model-config", str(wrong)))
    with pytest.raises(HiddenStatesError, match="prepare-hidden-states"):
        main(common(assets, tmp_path / "o3", "--train-hidden-states-path", str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="train-data-path"):
        main(["train", "--output-dir", str(tmp_path / "o4")])
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"learning-rate": 1e-3, "warmup-steps": 5}))
    with pytest.raises(ValueError, match="unknown key 'warmup-steps'"):
        main(common(assets, tmp_path / "o5", "--data-path", str(assets["data"]), "--config", str(cfg)))
    # resuming with another global batch would silently change the data order: refused
    out = tmp_path / "o6"
    assert main(common(assets, out, "--data-path", str(assets["data"]), "--max-num-steps", "2")) == 0
    with pytest.raises(CheckpointError, match="global batch 4"):
        main(common(assets, out, "--data-path", str(assets["data"]), "--resume", "--batch-size", "2"))
    with pytest.raises(CheckpointError, match="without --group-by-length"):
        main(common(assets, out, "--data-path", str(assets["data"]), "--resume", "--group-by-length"))
    with pytest.raises(CheckpointError, match="--max-answer-tokens 0; resuming with 3"):
        main(common(assets, out, "--data-path", str(assets["data"]), "--resume", "--max-answer-tokens", "3"))
    (out / "epoch_0_step_2" / "training_state" / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="trainer_state.json"):
        main(common(assets, out, "--data-path", str(assets["data"]), "--resume"))
    (out / "epoch_0_step_2" / "training_state" / "draft_fp32.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="draft_fp32.safetensors"):
        main(common(assets, out, "--data-path", str(assets["data"]), "--resume"))


def test_recipe_configs_name_only_real_flags():
    from specforge.args import load_config
    from specforge.cli import build_parser

    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    configs = sorted(Path(__file__).resolve().parents[2].glob("recipes/*/config.json"))
    assert len(configs) >= 5
    for path in configs:
        values = load_config(path, train)
        assert values["output_dir"] and values["ttt_length"] == 7, path


def test_build_vocab_writes_the_mapping_training_uses(assets, tmp_path):
    import datasets

    from specforge.vocab import build_vocab_mapping, count_tokens

    out = tmp_path / "vocab.safetensors"
    assert main(["build-vocab", "--data-path", str(assets["data"]), "--target-model-path", str(assets["target"]),
                 "--draft-vocab-size", "128", "--max-length", "32", "--output", str(out)]) == 0
    got = load_file(str(out))
    ds = datasets.load_from_disk(str(assets["data"]))
    ds = ds.map(lambda r: {"input_ids": r["input_ids"][:32], "loss_mask": r["loss_mask"][:32]})
    d2t, t2d = build_vocab_mapping(count_tokens(ds, VOCAB), VOCAB, 128)
    assert torch.equal(got["t2d"], t2d) and torch.equal(got["d2t"], d2t)


def test_recipe_scripts_parse():
    import subprocess

    scripts = sorted(Path(__file__).resolve().parents[2].glob("recipes/*/*.sh"))
    assert len(scripts) >= 6
    for script in scripts:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_online_training_from_chat_jsonl_with_the_smollm2_tokenizer(tmp_path):
    """The JSONL path end to end: specforge.data tokenizes with the target's chat template, then training runs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specbundle.assets import AssetNotFound, smollm2_gguf_path
    from specforge.target import load_tokenizer

    try:
        tokenizer = load_tokenizer(smollm2_gguf_path())
    except AssetNotFound as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    target = tmp_path / "target"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                                 vocab_size=len(tokenizer), tie_word_embeddings=True)).save_pretrained(target)
    tokenizer.save_pretrained(target)
    rows = [{"id": str(i), "conversations": [
        {"role": "user", "content": f"Count from {i} to {i + 5}."},
        {"role": "assistant", "content": " ".join(str(i + k) for k in range(6))}]} for i in range(8)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["train", "--target-model-path", str(target), "--data-path", str(data), "--output-dir", str(out),
                 "--batch-size", "4", "--max-length", "64", "--draft-vocab-size", "512", "--num-epochs", "1",
                 "--build-dataset-num-proc", "1", "--cache-dir", str(tmp_path / "cache"), "--report-to", "none"]) == 0
    draft = load_draft(out / "epoch_0_step_2", target_vocab_size=len(tokenizer))
    assert int(draft.t2d.sum()) == 512
    digits = tokenizer.convert_tokens_to_ids(["0", "1", "2"])
    assert all(draft.t2d[d] for d in digits)  # the assistant's most frequent tokens made the draft vocabulary


def test_ckpt_dir_starts_from_a_published_draft(assets, tmp_path):
    first = tmp_path / "first"
    assert main(common(assets, first, "--data-path", str(assets["data"]), "--max-num-steps", "2")) == 0
    src = first / "epoch_0_step_2"
    again = tmp_path / "again"
    assert main(common(assets, again, "--data-path", str(assets["data"]), "--ckpt-dir", str(src),
                       "--max-num-steps", "1", "--learning-rate", "1e-9")) == 0
    a, b = load_draft(src), load_draft(again / "epoch_0_step_1")
    assert torch.equal(a.t2d, b.t2d) and torch.equal(a.d2t, b.d2t)
    torch.testing.assert_close(a.fc.weight, b.fc.weight)  # a 1e-9 step leaves the bf16 weights where they were


def test_ckpt_dir_with_another_draft_vocab_size_remaps_the_lm_head(assets, tmp_path):
    first = tmp_path / "first"
    assert main(common(assets, first, "--data-path", str(assets["data"]), "--max-num-steps", "2")) == 0
    src = load_draft(first / "epoch_0_step_2", dtype=torch.float32)
    grown = tmp_path / "grown"
    args = common(assets, grown, "--data-path", str(assets["data"]), "--ckpt-dir", str(first / "epoch_0_step_2"),
                  "--max-num-steps", "1", "--learning-rate", "1e-9", "--save-dtype", "float32")
    args[args.index("--draft-vocab-size") + 1] = "192"
    assert main(args) == 0
    new = load_draft(grown / "epoch_0_step_1", dtype=torch.float32)
    cfg = json.loads((grown / "epoch_0_step_1" / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 192 and new.lm_head.weight.shape == (192, src.lm_head.weight.shape[1])
    assert int(new.t2d.sum()) == 192 and bool(new.t2d[torch.where(src.t2d)[0]].all())  # a superset of the old one
    torch.testing.assert_close(new.fc.weight, src.fc.weight)
    new_ids = torch.arange(192) + new.d2t
    src_ids = torch.arange(128) + src.d2t
    for row, tok in enumerate(new_ids.tolist()):
        if src.t2d[tok]:  # a token of both vocabularies keeps its trained row
            old_row = int((src_ids == tok).nonzero())
            torch.testing.assert_close(new.lm_head.weight[row], src.lm_head.weight[old_row])
    added = ~src.t2d[new_ids]
    assert int(added.sum()) == 64 and new.lm_head.weight[added].abs().sum(1).min() > 0


def test_remap_lm_head_maps_new_rows_through_the_least_squares_fit():
    from specforge.vocab import remap_lm_head

    g = torch.Generator().manual_seed(0)
    target = torch.randn(50, 6, generator=g)
    true_map = torch.randn(6, 4, generator=g)
    src_ids = torch.arange(0, 40, 2)  # 20 trained rows, exactly target rows @ true_map
    weight, report = remap_lm_head(target[src_ids] @ true_map, src_ids, torch.tensor([0, 1, 2, 45]), target)
    torch.testing.assert_close(weight, target[[0, 1, 2, 45]] @ true_map, atol=1e-4, rtol=1e-4)
    assert "2 rows kept, 2 mapped" in report and "residual 0.00" in report
    same, report = remap_lm_head(None, src_ids, torch.tensor([3, 7]), target)
    torch.testing.assert_close(same, target[[3, 7]])


def test_epochs_ending_before_the_lr_schedule_are_reported(assets, tmp_path, capsys):
    """40 rows in batches of 4: 10 steps per epoch. With --total-steps 30 one epoch ends the run while the cosine
    schedule is a third through, which is said at the start. A schedule that fits, or a deliberate stop at
    --max-num-steps (resumable), says nothing."""
    data = str(assets["data"])
    assert main(common(assets, tmp_path / "short", "--data-path", data, "--num-epochs", "1", "--total-steps", "30",
                       "--eval-holdout", "0")) == 0
    out = capsys.readouterr().out
    assert "training ends at step 10" in out and "--total-steps 30" in out
    lrs = [r["lr"] for r in metrics(tmp_path / "short", "train")]
    assert lrs[-1] > 0.5 * 3e-3  # the schedule did not finish
    assert main(common(assets, tmp_path / "fits", "--data-path", data, "--num-epochs", "1", "--total-steps", "10",
                       "--max-num-steps", "2", "--eval-holdout", "0")) == 0
    assert "training ends at step" not in capsys.readouterr().out


def test_cap_answer_tokens_cuts_each_turn():
    from specforge.trainer import cap_answer_tokens

    mask = torch.tensor([0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1])
    assert cap_answer_tokens(mask, 2).tolist() == [0, 1, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1]
    assert cap_answer_tokens(mask, 10).tolist() == mask.tolist()
    assert cap_answer_tokens(torch.zeros(3, dtype=torch.long), 2).tolist() == [0, 0, 0]


def test_max_answer_tokens_trains_as_on_capped_masks_with_shorter_rows(assets, tmp_path):
    """--max-answer-tokens 6 gives the weights of training on the same rows with their loss masks cut to 6 tokens per
    turn beforehand, though its rows end one token after the last scored one; -1 is refused."""
    import datasets

    from specforge.trainer import CappedAnswerRows, TokenRows, cap_answer_tokens

    ds = datasets.load_from_disk(str(assets["data"]))
    capped = ds.map(lambda r: {"loss_mask": cap_answer_tokens(torch.tensor(r["loss_mask"]), 6).tolist()})
    capped.save_to_disk(str(tmp_path / "capped"))
    rows = CappedAnswerRows(TokenRows(ds, 32), 6)
    assert rows.lengths == [min(len(r["input_ids"]), 32, 4 + 6 + 1) for r in ds]  # 4 prompt tokens, one turn
    assert rows[0]["loss_mask"].tolist() == [0] * 4 + [1] * 6 + [0]
    args = ["--num-epochs", "1", "--max-num-steps", "3", "--save-interval", "100", "--eval-holdout", "0"]
    flag, pre = tmp_path / "flag", tmp_path / "pre"
    assert main(common(assets, flag, "--data-path", str(assets["data"]), "--max-answer-tokens", "6", *args)) == 0
    assert main(common(assets, pre, "--data-path", str(tmp_path / "capped"), *args)) == 0
    a, b = master(flag / "epoch_0_step_3"), master(pre / "epoch_0_step_3")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert torch.equal(a["t2d"], b["t2d"])
    with pytest.raises(ValueError, match="--max-answer-tokens must be >= 0"):
        main(common(assets, tmp_path / "bad", "--data-path", str(assets["data"]), "--max-answer-tokens", "-1"))
