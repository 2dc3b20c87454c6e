"""Bundle traffic with the Hugging Face Hub (all of it through huggingface_hub).

pull: bundle.json is fetched first and its file names checked, then exactly the files it lists are fetched from the
same commit (`snapshot_download(allow_patterns=...)`, so HF_HUB_OFFLINE and the local cache behave as usual), then
everything is verified. A snapshot that fails verification is removed from the cache. With `local_dir`, the verified
files are copied into a temporary folder beside the destination, verified again and only then renamed into place.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from pathlib import Path

from specbundle.bundle import (
    CARD_NAME,
    CONFIG_NAME,
    METADATA_NAME,
    PLAIN_CHECKPOINT_PATTERNS,
    BundleError,
    BundleMetadata,
    TargetInfo,
    _cache_repo_root,
    bundle_files,
    check_hashes,
    check_member_name,
    check_target,
    record_hashes,
    sha256_file,
    verify_bundle,
)
from specbundle.card import write_card
from specbundle.catalog import find_by_target
from specbundle.target import is_hub_id

# Weights that a new push makes stale (and pickle files, which a bundle never holds).
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt"]


def resolve_repo_id(repo_or_target: str) -> tuple[str | None, Path | None]:
    """(Hub repo, packaged folder) for a bundle repo id or a catalog target id."""
    entry = find_by_target(repo_or_target)
    if entry is not None:
        return entry.repo_id, entry.packaged_path
    if not is_hub_id(repo_or_target):
        raise BundleError(f"{repo_or_target!r} is not a Hub repo id (org/name) nor a target in the catalog")
    return repo_or_target, None


def _hub_error(repo_id: str, revision: str | None, e: Exception) -> BundleError:
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision '{revision}'" if revision else ""
    if isinstance(e, RevisionNotFoundError):
        return BundleError(f"bundle repo '{repo_id}' has no revision '{revision}'")
    if isinstance(e, RepositoryNotFoundError):
        return BundleError(f"bundle repo '{repo_id}' not found on the Hub (or it is private and no token was given)")
    if isinstance(e, LocalEntryNotFoundError):
        return BundleError(
            f"bundle '{repo_id}'{at} is not in the local cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {e}"
        )
    return BundleError(f"cannot pull bundle '{repo_id}'{at}: {e}")


def _fetch_metadata(repo_id, revision, cache_dir, token, endpoint) -> tuple[Path | None, str | None]:
    """(bundle.json in the cache at `.../snapshots/<commit>/bundle.json`, None) or, for a repo without one,
    (None, the commit the Hub resolved `revision` to; None when offline)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        path = hf_hub_download(
            repo_id, METADATA_NAME, revision=revision, cache_dir=cache_dir, token=token, endpoint=endpoint
        )
    except RemoteEntryNotFoundError as e:
        return None, e.response.headers.get("X-Repo-Commit")
    except LocalEntryNotFoundError:
        # Offline without a cached bundle.json: a cached plain checkpoint may still be there; snapshot_download decides.
        return None, None
    except (HfHubHTTPError, OSError) as e:
        raise _hub_error(repo_id, revision, e) from e
    return Path(path), None


def _plain_checkpoint_files(repo_id, commit, token, endpoint) -> list[str]:
    """The files of a repo without bundle.json that a draft needs, every name checked before anything is fetched."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=endpoint, token=token)
    names = [f.path for f in api.list_repo_tree(repo_id, revision=commit, recursive=True) if isinstance(f, RepoFile)]
    selected = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in PLAIN_CHECKPOINT_PATTERNS)]
    for name in selected:
        check_member_name(name)
    return selected


def _discard_snapshot(snapshot: Path, meta: BundleMetadata | None) -> None:
    """Remove a cache snapshot that failed verification, and the cached blobs whose content is wrong."""
    root = _cache_repo_root(snapshot)
    if root is None:
        return
    blobs = (root / "blobs").resolve()
    for pointer in snapshot.rglob("*"):
        if not pointer.is_symlink():
            continue
        blob = pointer.resolve()
        name = pointer.relative_to(snapshot).as_posix()
        entry = meta.files.get(name) if meta is not None else None
        # Blobs are shared between commits: only a blob with wrong content goes.
        if blob.is_relative_to(blobs) and blob.is_file() and entry is not None and sha256_file(blob) != entry["sha256"]:
            blob.unlink()
    shutil.rmtree(snapshot, ignore_errors=True)


def _bundle_members(folder: Path, meta: BundleMetadata | None) -> list[str]:
    if meta is not None:
        return [METADATA_NAME, *meta.files]
    names = [CONFIG_NAME, *(p.name for p in sorted(folder.glob("*.safetensors")))]
    return names + ([CARD_NAME] if (folder / CARD_NAME).is_file() else [])


def install_bundle(source: Path, local_dir: str | Path, target: TargetInfo | None = None) -> Path:
    """Copy a verified bundle to `local_dir` through a temporary folder in its parent (atomic rename at the end)."""
    dest = Path(local_dir).expanduser().absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and not dest.is_dir():
        raise BundleError(f"destination {dest} exists and is not a folder")
    meta = BundleMetadata.from_file(source) if (source / METADATA_NAME).exists() else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        for name in _bundle_members(source, meta):
            out = tmp / name
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / name, out)  # follows cache symlinks: the destination holds plain files
        verify_bundle(tmp, target)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / dest.name)
            try:
                os.rename(tmp, dest)
            except OSError:
                os.rename(old / dest.name, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def pull_bundle(
    repo_or_target: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_dir: str | Path | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    target: TargetInfo | None = None,
) -> Path:
    """Fetch and verify a bundle; returns its folder (the cache snapshot, or `local_dir`)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    repo_id, packaged = resolve_repo_id(repo_or_target)
    if packaged is not None:
        report = verify_bundle(packaged, require_metadata=True)
        if target is not None:
            check_target(report.config, report.metadata, target)
        return install_bundle(packaged, local_dir, target) if local_dir is not None else packaged

    meta_path, commit = _fetch_metadata(repo_id, revision, cache_dir, token, endpoint)
    meta = None
    if meta_path is not None:
        snapshot = meta_path.parent
        try:
            meta = BundleMetadata.from_file(snapshot)
        except BundleError:
            _discard_snapshot(snapshot, None)
            raise
        # Pinned to the commit bundle.json came from, so the listed files and their hashes belong together.
        patterns, pinned = [METADATA_NAME, *meta.files], snapshot.name
    elif commit is not None:
        try:
            patterns, pinned = _plain_checkpoint_files(repo_id, commit, token, endpoint), commit
        except HfHubHTTPError as e:
            raise _hub_error(repo_id, revision, e) from e
    else:
        patterns, pinned = list(PLAIN_CHECKPOINT_PATTERNS), revision
    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=pinned,
                allow_patterns=patterns,
                cache_dir=cache_dir,
                token=token,
                endpoint=endpoint,
            )
        )
    except (HfHubHTTPError, OSError, ValueError) as e:
        # ValueError: huggingface_hub's own refusal of an unsafe repo file name.
        raise _hub_error(repo_id, revision, e) from e
    try:
        report = verify_bundle(snapshot)
    except BundleError as e:
        _discard_snapshot(snapshot, meta)
        raise BundleError(f"bundle '{repo_id}' refused (removed from the cache): {e}") from e
    if target is not None:
        check_target(report.config, report.metadata, target)
    return install_bundle(snapshot, local_dir, target) if local_dir is not None else snapshot


def _stage(folder: Path, staging: Path, names: list[str]) -> None:
    for name in names:
        out = staging / name
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(folder / name, out)  # no copy of large weights; nothing in staging is modified in place
        except OSError:
            shutil.copyfile(folder / name, out)


def push_bundle(
    folder: str | Path,
    repo_id: str,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    endpoint: str | None = None,
    rehash: bool = False,
    commit_message: str | None = None,
):
    """Create the repo (if needed) and upload the bundle with a card generated from bundle.json.

    The folder is not modified: the card and refreshed bundle.json are written in a staging copy. Files must match
    the hashes in bundle.json (the card excepted, it is regenerated) unless `rehash` re-records them.
    Returns huggingface_hub's CommitInfo (`.oid` is the new commit).
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    if not is_hub_id(repo_id):
        raise BundleError(f"{repo_id!r} is not a Hub repo id (org/name)")
    meta = BundleMetadata.from_file(folder)
    present = [n for n in bundle_files(folder) if n != CARD_NAME]
    if not rehash:
        check_hashes(folder, meta, skip=(CARD_NAME,))
        unlisted = [n for n in present if n not in meta.files]
        if unlisted:
            raise BundleError(
                f"file(s) {', '.join(unlisted)} in {folder} are not listed in {METADATA_NAME}; "
                "push with --rehash to include them"
            )
        present = [n for n in meta.files if n != CARD_NAME]
    with tempfile.TemporaryDirectory(prefix="specbundle-push-") as tmp:
        staging = Path(tmp) / "bundle"
        staging.mkdir()
        _stage(folder, staging, present)
        write_card(staging, meta, repo_id)
        record_hashes(staging, meta)
        meta.save(staging)
        verify_bundle(staging, require_metadata=True)
        api = HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            return api.upload_folder(
                folder_path=staging,
                repo_id=repo_id,
                repo_type="model",
                revision=revision,
                allow_patterns=[METADATA_NAME, *meta.files],
                delete_patterns=STALE_WEIGHT_PATTERNS,
                commit_message=commit_message or f"Upload EAGLE-3 bundle for {meta.target_id}",
            )
        except HfHubHTTPError as e:
            raise BundleError(f"cannot push to '{repo_id}': {e}") from e
