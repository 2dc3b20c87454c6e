"""push/pull through the real huggingface_hub client against the local fake Hub (tests/specbundle/fake_hub.py)."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from specbundle.bundle import BundleError, BundleMetadata, TargetInfo, sha256_file
from specbundle.hub import pull_bundle, push_bundle

from .conftest import TINY_TARGET_ID, make_tiny_bundle, run_cli

REPO = "user/tiny-eagle3"
TOKEN = "hf_fake_token"


def _push(hub, folder, **kw):
    return push_bundle(folder, REPO, endpoint=hub.url, token=TOKEN, **kw)


def _pull(hub, tmp_path, **kw):
    return pull_bundle(REPO, cache_dir=tmp_path / "cache", endpoint=hub.url, **kw)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


def test_push_creates_repo_with_card_and_regular_uploads(hub, tiny_bundle):
    info = _push(hub, tiny_bundle)
    commit = hub.head(REPO)
    assert info.oid == commit.oid
    assert sorted(commit.files) == [".gitattributes", "README.md", "bundle.json", "config.json", "model.safetensors"]
    # Uploaded content is byte-identical to the folder (the card and bundle.json are regenerated in staging).
    for name in ("config.json", "model.safetensors"):
        assert commit.files[name] == (tiny_bundle / name).read_bytes()
    meta = BundleMetadata.from_dict(json.loads(commit.files["bundle.json"]))
    import hashlib

    for name, entry in meta.files.items():
        assert hashlib.sha256(commit.files[name]).hexdigest() == entry["sha256"]
    card = commit.files["README.md"].decode()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == TINY_TARGET_ID
    assert front["library_name"] == "sglang"
    assert front["license"] == "apache-2.0"
    assert front["datasets"] == ["anon8231489123/ShareGPT_Vicuna_unfiltered"]
    assert "eagle3" in front["tags"]
    assert "| mt-bench | 2.50 |" in card and "| gsm8k | 3.10 |" in card
    assert f"--speculative-draft-model-path {REPO}" in card
    # Only regular-file endpoints were used: no LFS batch, no xet token/CAS traffic.
    assert not [p for _, p in hub.requests if "lfs" in p or "xet" in p]
    # The source folder was not modified by the push.
    assert "<this-repo>" in (tiny_bundle / "README.md").read_text()


def test_push_requires_a_token_on_the_server(hub, tiny_bundle):
    with pytest.raises(BundleError, match="cannot push to 'user/tiny-eagle3'.*401"):
        push_bundle(tiny_bundle, REPO, endpoint=hub.url, token=False)


def test_push_refuses_changed_files_unless_rehash(hub, tiny_bundle):
    (tiny_bundle / "config.json").write_text((tiny_bundle / "config.json").read_text().replace("64", "64 "))
    with pytest.raises(BundleError, match="'config.json' fails its sha256 check"):
        _push(hub, tiny_bundle)
    assert REPO not in hub.repos
    _push(hub, tiny_bundle, rehash=True)
    meta = BundleMetadata.from_dict(json.loads(hub.head(REPO).files["bundle.json"]))
    assert meta.files["config.json"]["sha256"] == sha256_file(tiny_bundle / "config.json")


def test_pull_into_empty_cache_fetches_only_bundle_files(hub, tiny_bundle, tmp_path):
    _push(hub, tiny_bundle)
    # Files a bundle never needs (a pickle checkpoint, an unrelated file) sit in the repo too.
    hub.head(REPO).files["pytorch_model.bin"] = b"\x80\x04 not a pickle to load"
    hub.head(REPO).files["notes/extra.txt"] = b"x"
    start = len(hub.requests)
    path = _pull(hub, tmp_path)
    assert path.parent.name == "snapshots" and path.name == hub.head(REPO).oid
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "bundle.json", "config.json", "model.safetensors"]
    assert sha256_file(path / "model.safetensors") == sha256_file(tiny_bundle / "model.safetensors")
    fetched = sorted({p.rsplit("/", 1)[-1] for m, p in hub.requests[start:] if m == "GET" and "/resolve/" in p})
    assert fetched == ["README.md", "bundle.json", "config.json", "model.safetensors"]


def test_pull_again_offline_uses_the_cache(hub, tiny_bundle, tmp_path):
    _push(hub, tiny_bundle)
    online = _pull(hub, tmp_path)
    served = len(hub.requests)
    # A fresh interpreter: HF_HUB_OFFLINE is read when huggingface_hub is imported.
    offline = run_cli("pull", REPO, "--cache-dir", str(tmp_path / "cache"), hub_url=hub.url, offline=True)
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.strip() == str(online)
    assert len(hub.requests) == served  # not one request reached the Hub
    # Offline with an empty cache: a clear error, not a traceback.
    empty = run_cli("pull", REPO, "--cache-dir", str(tmp_path / "empty"), hub_url=hub.url, offline=True)
    assert empty.returncode == 1
    assert "not in the local cache" in empty.stderr and REPO in empty.stderr


def test_pull_pinned_revision_gets_the_old_content(hub, tmp_path):
    first = make_tiny_bundle(tmp_path / "v1", seed=1)
    second = make_tiny_bundle(tmp_path / "v2", seed=2)
    assert sha256_file(first / "model.safetensors") != sha256_file(second / "model.safetensors")
    c1 = _push(hub, first).oid
    c2 = _push(hub, second).oid
    assert c1 != c2
    old = _pull(hub, tmp_path, revision=c1)
    new = _pull(hub, tmp_path)
    assert old.name == c1 and new.name == c2
    assert sha256_file(old / "model.safetensors") == sha256_file(first / "model.safetensors")
    assert sha256_file(new / "model.safetensors") == sha256_file(second / "model.safetensors")
    # --local-dir installs plain files of the pinned commit.
    dest = _pull(hub, tmp_path, revision=c1, local_dir=tmp_path / "out" / "draft")
    assert not (dest / "model.safetensors").is_symlink()
    assert sha256_file(dest / "model.safetensors") == sha256_file(first / "model.safetensors")
    assert _leftovers(tmp_path / "out") == ["draft"]


def test_pull_by_branch_revision(hub, tiny_bundle, tmp_path):
    _push(hub, tiny_bundle, revision="v1.0")
    assert "v1.0" in hub.repos[REPO].branches
    path = _pull(hub, tmp_path, revision="v1.0")
    assert path.name == hub.repos[REPO].branches["v1.0"]
    with pytest.raises(BundleError, match="has no revision 'nope'"):
        _pull(hub, tmp_path, revision="nope")


def _assert_refused(hub, tmp_path, match, **kw):
    dest = tmp_path / "drafts" / "tiny"
    with pytest.raises(BundleError, match=match):
        _pull(hub, tmp_path, local_dir=dest, **kw)
    assert not dest.exists()
    assert _leftovers(dest.parent) == []  # no partial folder beside the destination
    snapshots = tmp_path / "cache" / "models--user--tiny-eagle3" / "snapshots"
    assert _leftovers(snapshots) == []  # the unverified snapshot was removed from the cache


def test_tampered_file_is_refused(hub, tiny_bundle, tmp_path):
    _push(hub, tiny_bundle)
    data = bytearray(hub.head(REPO).files["model.safetensors"])
    data[-1] ^= 0xFF
    hub.tamper(REPO, "model.safetensors", bytes(data))
    _assert_refused(hub, tmp_path, r"'model.safetensors' fails its sha256 check")
    blobs = tmp_path / "cache" / "models--user--tiny-eagle3" / "blobs"
    assert all(sha256_file(b) != __import__("hashlib").sha256(bytes(data)).hexdigest() for b in blobs.iterdir())


def test_missing_file_is_refused(hub, tiny_bundle, tmp_path):
    _push(hub, tiny_bundle)
    del hub.head(REPO).files["model.safetensors"]
    _assert_refused(hub, tmp_path, r"'model.safetensors' listed in bundle.json is missing")


@pytest.mark.parametrize("bad_name", ["../escape.safetensors", "/etc/passwd", "weights/../../x.json", "a\\..\\b"])
def test_path_traversal_name_is_refused_before_download(hub, tiny_bundle, tmp_path, bad_name):
    _push(hub, tiny_bundle)
    meta = json.loads(hub.head(REPO).files["bundle.json"])
    meta["files"][bad_name] = {"sha256": "0" * 64, "size": 1}
    hub.tamper(REPO, "bundle.json", json.dumps(meta).encode())
    start = len(hub.requests)
    _assert_refused(hub, tmp_path, r"escape the bundle folder")
    fetched = [p for m, p in hub.requests[start:] if m == "GET" and "/resolve/" in p]
    assert all(p.endswith("/bundle.json") for p in fetched)


def test_target_mismatch_is_refused(hub, tiny_bundle, tmp_path):
    _push(hub, tiny_bundle)
    wrong_hidden = TargetInfo(id=TINY_TARGET_ID, hidden_size=128, vocab_size=256, num_hidden_layers=8)
    dest = tmp_path / "drafts" / "tiny"
    with pytest.raises(BundleError, match=r"target mismatch: draft 'target_hidden_size' is 64 .* hidden size 128"):
        _pull(hub, tmp_path, local_dir=dest, target=wrong_hidden)
    assert not dest.exists() and _leftovers(dest.parent) == []
    with pytest.raises(BundleError, match=r"target mismatch: the bundle is for 'tiny-org/TinyLlama-8L', not 'a/b'"):
        _pull(hub, tmp_path, local_dir=dest, target=TargetInfo(id="a/b"))
    with pytest.raises(BundleError, match=r"aux layer ids \[4\] do not exist in the 4 layers"):
        _pull(hub, tmp_path, local_dir=dest, target=TargetInfo(id=None, num_hidden_layers=4))
    assert not dest.exists()


def test_failed_pull_keeps_an_existing_local_dir_intact(hub, tiny_bundle, tmp_path):
    _push(hub, tiny_bundle)
    dest = _pull(hub, tmp_path, local_dir=tmp_path / "drafts" / "tiny")
    before = {p.name: sha256_file(p) for p in dest.iterdir()}
    hub.tamper(REPO, "config.json", b"{}")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(BundleError, match="'config.json' fails its sha256 check"):
        _pull(hub, tmp_path, local_dir=dest)
    assert {p.name: sha256_file(p) for p in dest.iterdir()} == before
    assert _leftovers(dest.parent) == ["tiny"]


def test_pull_plain_sglang_checkpoint_without_metadata(hub, tiny_bundle, tmp_path):
    """A SpecBundle/SGLang repo has config.json + model.safetensors and no bundle.json: structure is checked."""
    _push(hub, tiny_bundle)
    del hub.head(REPO).files["bundle.json"]
    path = _pull(hub, tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    hub.tamper(REPO, "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(BundleError, match="cannot read safetensors file"):
        _pull(hub, tmp_path)


def test_plain_checkpoint_with_escaping_file_name_is_refused_before_download(hub, tiny_bundle, tmp_path):
    _push(hub, tiny_bundle)
    del hub.head(REPO).files["bundle.json"]
    hub.head(REPO).files["../evil.safetensors"] = b"x"
    start = len(hub.requests)
    _assert_refused(hub, tmp_path, r"'../evil.safetensors' contains '..'")
    assert not [p for m, p in hub.requests[start:] if m == "GET" and "/resolve/" in p and "bundle.json" not in p]
    assert not (tmp_path / "evil.safetensors").exists()


def test_pickle_file_listed_in_metadata_is_refused(hub, tiny_bundle, tmp_path):
    _push(hub, tiny_bundle)
    meta = json.loads(hub.head(REPO).files["bundle.json"])
    meta["files"]["pytorch_model.bin"] = {"sha256": "0" * 64, "size": 1}
    hub.tamper(REPO, "bundle.json", json.dumps(meta).encode())
    _assert_refused(hub, tmp_path, r"'pytorch_model.bin' is a pickle-format file")


def test_unknown_repo_is_a_clear_error(hub, tmp_path):
    with pytest.raises(BundleError, match="bundle repo 'user/nothing-here' not found"):
        pull_bundle("user/nothing-here", cache_dir=tmp_path / "cache", endpoint=hub.url)
