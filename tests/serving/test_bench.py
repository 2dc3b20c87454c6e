"""`specserve bench` end to end on the real SmolLM2 model and its bundled draft (CPU, fp32, few short prompts):
offline rows and JSON, alternating repeats, plots, the config sweep into bundle.json, and online mode over HTTP."""

import json
import shutil
from pathlib import Path

import pytest

from serving import bench
from specbundle.bundle import BundleMetadata, verify_bundle
from specbundle.resolve import resolve_draft
from tests.serving.server_utils import RunningServer

CPU = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "4096", "--quiet"]


def load_script(name: str):
    """A script of benchmarks/ as a module (the folder is no package)."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_bench_alternates_repeats_and_writes_json_and_plots(tmp_path, capsys):
    out = tmp_path / "res" / "bench.json"
    rc = bench.main(
        ["--speculative", "--disable-speculative-adaptive", "--batch-sizes", "1,2", "--num-prompts", "2",
         "--max-tokens", "8", "--repeats", "3", "--out", str(out), "--plot-dir", str(tmp_path / "plots"), *CPU]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert [(r["system"], r["batch"]) for r in rows] == [
        ("plain", 1), ("speculative", 1), ("plain", 2), ("speculative", 2)
    ]  # fmt: skip
    for plain, spec in zip(rows[::2], rows[1::2]):
        for row in (plain, spec):
            assert row["requests"] == 2 and row["output_tokens"] == 16
            rates = row["repeats_output_tokens_per_s"]
            assert len(rates) == 3 and row["output_tokens_per_s"] == sorted(rates)[1]
            assert row["ttft_s"]["p50"] > 0 and row["itl_s"]["p50"] > 0
        ratios = [s / p for s, p in zip(spec["repeats_output_tokens_per_s"], plain["repeats_output_tokens_per_s"])]
        assert spec["repeats_speedup"] == pytest.approx(sorted(ratios))
        assert spec["speedup"] == pytest.approx(sorted(ratios)[1])
        assert spec["accept_length"] >= 1.0 and spec["spec_config"] == "num_steps=3 topk=2 num_draft_tokens=4"
        assert len(spec["acceptance_per_position"]) == 3
    assert res["acceptance_per_position"] == rows[1]["acceptance_per_position"]
    pngs = ["acceptance_per_position.png", "speedup_vs_batch.png"]
    assert sorted(p.split("/")[-1] for p in res["plots"]) == pngs
    assert all((tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
    table = capsys.readouterr().out
    assert "speculative" in table and "TTFT p50" in table


def test_bench_rejects_a_repeat_count_below_one():
    with pytest.raises(SystemExit, match="--repeats must be >= 1"):
        bench.main(["--repeats", "0", *CPU])


def test_sweep_writes_the_fastest_config_into_the_bundle(tmp_path):
    folder = tmp_path / "draft"
    shutil.copytree(resolve_draft("HuggingFaceTB/SmolLM2-135M-Instruct", None), folder)
    out = tmp_path / "sweep.json"
    rc = bench.main(
        ["sweep", "--speculative-draft-model-path", str(folder), "--num-prompts", "2", "--max-tokens", "8",
         "--candidates", "1,1,2;2,2,4", "--write-bundle", "--out", str(out), *CPU]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(t["num_steps"], t["eagle_topk"], t["num_draft_tokens"]) for t in res["trials"]] == [(1, 1, 2), (2, 2, 4)]
    best = max(res["trials"], key=lambda t: t["output_tokens_per_s"])
    assert res["best"] == best
    spec = BundleMetadata.from_file(folder).speculative
    assert (spec.num_steps, spec.eagle_topk, spec.num_draft_tokens) == (
        best["num_steps"], best["eagle_topk"], best["num_draft_tokens"]
    )  # fmt: skip
    verify_bundle(folder)  # the weights' recorded hashes still hold


@pytest.mark.parametrize("speculative", [False, True])
def test_online_bench_measures_a_running_server(tmp_path, smollm2_target, smollm2_folder, speculative):
    from serving.config import EngineConfig
    from serving.engine import Engine

    cfg = EngineConfig(device="cpu", dtype="float32", max_total_tokens=4096, speculative=speculative,
                       disable_speculative_adaptive=True)  # fmt: skip
    engine = Engine(cfg, smollm2_target)
    out = tmp_path / "online.json"
    with RunningServer(engine) as server:
        rc = bench.main(
            ["--mode", "online", "--base-url", server.url, "--tokenizer", str(smollm2_folder), "--num-prompts", "3",
             "--max-tokens", "6", "--concurrency", "1,3", "--out", str(out), "--quiet"]
        )  # fmt: skip
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["requests"] == 3 and r["output_tokens"] == 18
        assert r["output_tokens_per_s"] > 0 and r["ttft_s"]["p50"] > 0
        # the server's per-response spec_decoding figures, summed over the responses
        assert ("accept_length" in r) == speculative and (not speculative or 1.0 <= r["accept_length"] <= 4.0)


def test_spec_phases_script_splits_an_iteration(tmp_path):
    module = load_script("spec_phases")
    out = tmp_path / "phases.json"
    assert module.main(["--device", "cpu", "--num-prompts", "1", "--max-tokens", "8", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())
    assert r["config"] == "3,1,4" and r["iterations"] > 0 and r["tokens"] == 8
    phases = r["phase_ms"]
    assert {"_grow_tree", "verify", "_draft_extend", "decode_step"} <= set(phases)
    inside = sum(v for k, v in phases.items() if k not in ("decode_step", "_commit", "_draft_extend"))
    assert 0 < inside < phases["decode_step"] <= r["synced_ms_per_iteration"]


def test_plain_mode_cost_script_runs_the_three_engines_in_turn(tmp_path):
    module = load_script("plain_mode_cost")
    out = tmp_path / "cost.json"
    args = ["--device", "cpu", "--num-prompts", "2", "--max-tokens", "6", "--repeats", "2", "--out", str(out)]
    assert module.main(args) == 0
    r = json.loads(out.read_text())
    assert set(r["tok_per_s"]) == set(module.SYSTEMS)
    assert all(len(v) == 2 and min(v) > 0 for v in r["tok_per_s"].values())
    assert r["ratio_to_plain"]["plain"] == 1.0
    calls = r["ms_per_call"]
    assert "plain:after_prefill" not in calls
    assert calls["spec_plain_deferred:after_prefill"][0] == calls["spec_plain_prefill_draft:after_prefill"][0] > 0
    assert calls["plain:prefill_forward"][0] == calls["spec_plain_deferred:prefill_forward"][0] > 0


def test_adaptive_trace_script_accounts_for_every_decode_iteration(tmp_path):
    module = load_script("adaptive_trace")
    out = tmp_path / "trace.json"
    args = ["--device", "cpu", "--batch-sizes", "2", "--num-prompts", "3", "--max-tokens", "6", "--passes", "2",
            "--warm-up", "short", "--out", str(out)]  # fmt: skip
    assert module.main(args) == 0
    (passes,) = json.loads(out.read_text()).values()
    assert len(passes) == 2
    for row in passes:
        for name, r in row.items():
            assert r["speculative_iterations"] + r["plain_iterations"] == len(r["iterations"]) > 0
            # every output token but each request's first (from its prefill) comes from a decode iteration
            assert r["speculative_tokens"] + r["plain_tokens"] == 3 * 6 - 3
            assert name == "speculative" or r["speculative_iterations"] == 0


def test_lossless_script_compares_token_for_token(tmp_path):
    module = load_script("lossless_mtbench")
    out = tmp_path / "lossless.json"
    args = ["--out", str(out), "--num-prompts", "3", "--max-tokens", "12", "--batch-sizes", "2", "--drafts",
            "trained,random", "--configs", "recommended=3,2,4;chain=2,1,3"]  # fmt: skip
    assert module.main(args) == 0
    res = json.loads(out.read_text())
    runs = [r for r in res["runs"] if r["system"] == "speculative"]
    assert [(r["draft"], r["shape"], r["config"]) for r in runs] == [
        ("trained", "recommended", "3/2/4"), ("trained", "chain", "2/1/3"),
        ("random", "recommended", "3/2/4"), ("random", "chain", "2/1/3"),
    ]  # fmt: skip
    assert all(r["identical"] == r["of"] == 3 and not r["first_differences"] for r in runs)
    assert res["command"].endswith(" ".join(args))
    with pytest.raises(SystemExit, match="not name=num_steps,topk,num_draft_tokens"):
        module.main(["--out", str(out), "--configs", "tree=5,4"])


def test_draft_accuracy_script_scores_each_mtbench_category(tmp_path):
    module = load_script("draft_accuracy")
    draft = str(Path(__file__).resolve().parents[2] / "specbundle" / "bundles" / "smollm2-135m-instruct-eagle3")
    out = tmp_path / "acc.json"
    # the first 12 questions: 10 writing, 2 roleplay
    args = ["--drafts", draft, "--num-prompts", "12", "--max-tokens", "5", "--by-category", "--out", str(out)]
    assert module.main(args) == 0
    (row,) = json.loads(out.read_text())["drafts"]
    assert set(row) == {"draft", "all", "category_writing", "category_roleplay"}
    assert row["category_writing"]["tokens"] + row["category_roleplay"]["tokens"] == row["all"]["tokens"] == 12 * 5
    assert all(0 <= a <= 1 for part in ("all", "category_writing") for a in row[part]["acc"])
    with pytest.raises(SystemExit):
        module.main(["--drafts", draft, "--conversations", str(out), "--by-category"])


def test_draft_accuracy_script_scores_the_trainers_heldout_rows(tmp_path):
    """--rows heldout/train pick the rows `specforge train --eval-holdout 2 --seed 0` evaluates on / trains on."""
    from serving.models.loader import resolve_model_path
    from specforge.target import load_tokenizer
    from specforge.trainer import holdout_split

    module = load_script("draft_accuracy")
    draft = str(Path(__file__).resolve().parents[2] / "specbundle" / "bundles" / "smollm2-135m-instruct-eagle3")
    conv = tmp_path / "conv.jsonl"
    rows = [{"id": str(k), "conversations": [{"role": "user", "content": f"Count to {k + 2}."},
                                            {"role": "assistant", "content": " ".join(map(str, range(1, k + 3)))}]}
            for k in range(6)]  # fmt: skip
    rows.insert(3, {"id": "no-answer", "conversations": [{"role": "user", "content": "Hi."}]})  # dropped by training
    conv.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    kept = [0, 1, 2, 4, 5, 6]  # file rows that training keeps
    held = {kept[i] for i in holdout_split(6, 2, 0)[1]}
    tokenizer = load_tokenizer(resolve_model_path(None)[0])
    assert module.training_split(str(conv), tokenizer, "heldout", 2, 0) == held
    assert module.training_split(str(conv), tokenizer, "train", 2, 0) == set(kept) - held
    for which, count in (("heldout", 2), ("train", 4)):
        out = tmp_path / f"{which}.json"
        args = ["--drafts", draft, "--conversations", str(conv), "--rows", which, "--eval-holdout", "2"]
        assert module.main([*args, "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["answers"] == count and f"({which} rows at --eval-holdout 2 --seed 0)" in res["source"]
    with pytest.raises(SystemExit):
        module.main(["--drafts", draft, "--rows", "heldout"])
