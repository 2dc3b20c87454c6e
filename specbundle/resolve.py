"""What the server calls to find a draft for its target: a local folder, a Hub repo, or the catalog's bundle."""

from __future__ import annotations

from pathlib import Path

from specbundle.bundle import METADATA_NAME, BundleError, BundleMetadata, SpeculativeConfig, TargetInfo, verify_bundle
from specbundle.catalog import find_by_target
from specbundle.hub import pull_bundle
from specbundle.target import is_hub_id, load_target_info, target_id_of


def _target_info(target: str) -> TargetInfo:
    """A local HF folder gives its full config (cheap); a GGUF file or a Hub id gives the id only (the server reads
    the weights anyway and load_draft checks the sizes against them)."""
    path = Path(target).expanduser()
    if path.is_dir():
        return load_target_info(path)
    return TargetInfo(id=target_id_of(target))


def resolve_draft(target: str, draft: str | None = None, revision: str | None = None) -> Path:
    """The verified bundle folder to serve `target` with.

    `draft`: a local bundle folder (verified in place), a Hub repo id (pulled at `revision` into the HF cache), or
    None for the catalog's bundle for the target (the SmolLM2 bundle ships in this package: no network).
    Raises BundleError naming the target when no bundle is known or the draft does not fit it.
    """
    target = str(target)
    if draft is None and target_id_of(target) is None:
        raise BundleError(
            f"no bundle is known for target {target!r}: it names no Hub model id (a local folder needs "
            "'_name_or_path' in its config.json); pass a draft explicitly"
        )
    info = _target_info(target)
    if draft is not None:
        path = Path(draft).expanduser()
        if path.exists():
            if not path.is_dir():
                raise BundleError(f"draft {draft} is a file; a bundle is a folder (config.json + model.safetensors)")
            verify_bundle(path, info)
            return path.resolve()
        if is_hub_id(str(draft)):
            return pull_bundle(str(draft), revision=revision, target=info)
        raise BundleError(f"draft {draft!r} is neither an existing folder nor a Hub repo id (org/name)")
    entry = find_by_target(info.id)
    if entry is None:
        raise BundleError(
            f"no bundle is known for target '{info.id}' (see `specbundle list`); pass a draft folder or Hub repo"
        )
    return pull_bundle(entry.target_id, revision=revision, target=info)


def speculative_defaults(folder: str | Path) -> SpeculativeConfig:
    """The bundle's recommended num_steps / eagle_topk / num_draft_tokens; SpecBundle's published 3 / 1 / 4 for a
    plain checkpoint without bundle.json."""
    folder = Path(folder)
    if (folder / METADATA_NAME).exists():
        return BundleMetadata.from_file(folder).speculative
    return SpeculativeConfig()
