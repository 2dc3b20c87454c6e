"""Local bundle folders: metadata, hashes, safe names, symlinks, the card, and the packaged SmolLM2 bundle."""

import json
import os

import pytest
import yaml

from specbundle.bundle import (
    BundleError,
    BundleMetadata,
    TargetInfo,
    check_member_name,
    verify_bundle,
)
from specbundle.catalog import CATALOG, find_by_repo, find_by_target, format_catalog
from specbundle.checkpoint import load_draft, read_shapes

from .conftest import TINY_TARGET, TINY_TARGET_ID

PACKAGED = find_by_target("HuggingFaceTB/SmolLM2-135M-Instruct").packaged_path


def test_verify_tiny_bundle_against_its_target(tiny_bundle):
    target = TargetInfo(TINY_TARGET_ID, 64, 256, 8)
    report = verify_bundle(tiny_bundle, target)
    assert report.metadata.target_id == TINY_TARGET_ID
    assert report.config.effective_draft_vocab_size == 64
    assert report.checks[0] == "sha256 of 3 file(s) match bundle.json"
    assert report.checks[-1] == (
        "target agrees: target id tiny-org/TinyLlama-8L, hidden size 64, vocabulary 256, aux layers [1, 3, 4] of 8"
    )


@pytest.mark.parametrize(
    "name, problem",
    [
        ("../model.safetensors", "escape"),
        ("a/../../b", "escape"),
        ("/abs/model.safetensors", "absolute"),
        ("C:/x.json", "absolute"),
        ("a\\b.json", "absolute"),
        (".hidden", "unsupported characters"),
        ("model-*.safetensors", "unsupported characters"),
        ("a//b", "escape"),
        ("bundle.json", "cannot list itself"),
    ],
)
def test_unsafe_member_names_are_refused(name, problem):
    with pytest.raises(BundleError, match=problem):
        check_member_name(name)


def test_safe_member_names_pass():
    for name in ("model.safetensors", "sub/model-00001-of-00002.safetensors", "README.md", "config.json"):
        assert check_member_name(name) == name


def test_tampered_local_file_is_refused(tiny_bundle):
    weights = tiny_bundle / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(
        BundleError, match=r"'model.safetensors' fails its sha256 check: bundle.json records [0-9a-f]{64}"
    ):
        verify_bundle(tiny_bundle)


def test_symlinked_file_is_refused(tiny_bundle, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_bytes((tiny_bundle / "config.json").read_bytes())
    (tiny_bundle / "config.json").unlink()
    os.symlink(outside, tiny_bundle / "config.json")
    with pytest.raises(BundleError, match=r"'config.json' is a symlink"):
        verify_bundle(tiny_bundle)


def test_unlisted_safetensors_is_refused(tiny_bundle):
    # load_draft would read it: an unverified extra shard must not slip in.
    (tiny_bundle / "extra.safetensors").write_bytes((tiny_bundle / "model.safetensors").read_bytes())
    with pytest.raises(BundleError, match=r"extra.safetensors in .* not listed in bundle.json"):
        verify_bundle(tiny_bundle)


def test_sealing_refuses_pickle_files(tiny_bundle):
    from specbundle.bundle import seal_bundle

    (tiny_bundle / "training_state.pt").write_bytes(b"\x80\x04.")
    with pytest.raises(
        BundleError, match=r"'training_state.pt' is a pickle-format file; bundles carry safetensors only"
    ):
        seal_bundle(tiny_bundle)


def test_metadata_must_agree_with_config(tiny_bundle):
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    meta["draft_vocab_size"] = 65
    (tiny_bundle / "bundle.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"'draft_vocab_size' is 65 but config.json gives 64"):
        verify_bundle(tiny_bundle)


def test_metadata_round_trip_and_errors(tiny_bundle):
    meta = BundleMetadata.from_file(tiny_bundle)
    assert BundleMetadata.from_dict(meta.to_dict()) == meta
    assert meta.speculative.num_draft_tokens == 4 and meta.accept_length == {"mt-bench": 2.5, "gsm8k": 3.1}
    with pytest.raises(BundleError, match="missing 'target.id'"):
        BundleMetadata.from_dict({"aux_layer_ids": [1, 2, 3], "draft_vocab_size": 8})
    with pytest.raises(BundleError, match="'speculative.eagle_topk' must be a positive integer"):
        BundleMetadata.from_dict({**meta.to_dict(), "speculative": {"eagle_topk": 0}})
    with pytest.raises(BundleError, match="has no valid sha256"):
        BundleMetadata.from_dict({**meta.to_dict(), "files": {"config.json": {"sha256": "abc"}}})


def test_plain_checkpoint_without_metadata_is_checked_structurally(tiny_bundle):
    (tiny_bundle / "bundle.json").unlink()
    report = verify_bundle(tiny_bundle, TargetInfo(None, 64, 256, 8))
    assert "hashes not checked" in report.checks[0]
    with pytest.raises(BundleError, match="has no bundle.json"):
        verify_bundle(tiny_bundle, require_metadata=True)
    with pytest.raises(BundleError, match="draft 'vocab_size' is 256 but the target has vocabulary size 300"):
        verify_bundle(tiny_bundle, TargetInfo(None, 64, 300, 8))


def test_card_front_matter_and_results(tiny_bundle):
    card = (tiny_bundle / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {
        "base_model": TINY_TARGET_ID,
        "datasets": ["anon8231489123/ShareGPT_Vicuna_unfiltered"],
        "library_name": "sglang",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["eagle3", "speculative-decoding", "draft-model", "sglang", "specforge", "specbundle"],
    }
    assert "| benchmark | accept length |" in card and "| mt-bench | 2.50 |" in card
    assert "--speculative-num-draft-tokens 4" in card
    assert "Untrained placeholder" not in card


def test_packaged_smollm2_bundle():
    meta = BundleMetadata.from_file(PACKAGED)
    assert meta.trained is True and meta.target_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta.aux_layer_ids == [1, 14, 26] and meta.draft_vocab_size == 16384
    report = verify_bundle(PACKAGED, TargetInfo("HuggingFaceTB/SmolLM2-135M-Instruct", 576, 49152, 30))
    cfg = report.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (576, 9, 3, 64)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.rope_theta) == (1536, 49152, 100000.0)
    assert cfg.max_position_embeddings == 8192
    shapes = read_shapes(PACKAGED)
    assert shapes["fc.weight"] == (576, 3 * 576) and shapes["lm_head.weight"] == (16384, 576)
    assert "Untrained placeholder" not in (PACKAGED / "README.md").read_text()
    model = load_draft(PACKAGED, target_hidden_size=576, target_vocab_size=49152)
    assert int(model.t2d.sum()) == 16384
    # A trained vocabulary map: the most frequent assistant tokens, not the first 16384 ids.
    assert int(model.d2t.abs().sum()) > 0


def test_catalog():
    assert find_by_target("huggingfacetb/smollm2-135m-instruct").packaged == "smollm2-135m-instruct-eagle3"
    assert find_by_target("meta-llama/Llama-3.1-8B-Instruct").repo_id == (
        "lmsys/SGLang-EAGLE3-Llama-3.1-8B-Instruct-SpecForge"
    )
    assert find_by_repo("lmsys/SGLang-EAGLE3-Qwen3-235B-A22B-Instruct-2507-SpecForge-Meituan").target_id == (
        "Qwen/Qwen3-235B-A22B-Instruct-2507"
    )
    assert find_by_target("nobody/nothing") is None
    table = format_catalog()
    assert all(e.target_id in table and e.location in table for e in CATALOG)
    assert TINY_TARGET["num_hidden_layers"] == 8
