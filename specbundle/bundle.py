"""A bundle: a draft checkpoint folder + model card + `bundle.json` (target, recipe, results, sha256 of every file).

Safety rules enforced here, for local folders and pulled snapshots alike: file names listed in the metadata are plain
relative names (no absolute paths, no `..`, no glob or control characters), no file may be a symlink that leaves the
bundle (snapshots in the Hugging Face cache may link into their own repo's `blobs/`), every listed file must exist
with the recorded size and sha256, and weights are read from safetensors headers only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from specbundle.config import DraftConfig, DraftConfigError, default_aux_layer_ids

METADATA_NAME = "bundle.json"
CARD_NAME = "README.md"
CONFIG_NAME = "config.json"
FORMAT = "specbundle/1"
# Pickle-based checkpoint formats: never part of a bundle (nothing here loads them).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# The files a pull fetches from a repo without bundle.json (SGLang / SpecForge checkpoints as published).
PLAIN_CHECKPOINT_PATTERNS = ("config.json", "*.safetensors", "README.md")

# One path component: starts with a letter or digit, so '.', '..' and hidden files are impossible; no glob characters
# (names are passed to the Hub client as allow_patterns).
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class BundleError(ValueError):
    """A bundle that cannot be used; the message names the file, field or target at fault."""


@dataclass
class SpeculativeConfig:
    """Recommended SGLang flags: --speculative-num-steps/-eagle-topk/-num-draft-tokens."""

    num_steps: int = 3
    eagle_topk: int = 1
    num_draft_tokens: int = 4
    algorithm: str = "EAGLE3"

    def __post_init__(self):
        for name in ("num_steps", "eagle_topk", "num_draft_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BundleError(f"bundle metadata 'speculative.{name}' must be a positive integer, got {value!r}")


@dataclass
class BundleMetadata:
    target_id: str
    aux_layer_ids: list[int]
    draft_vocab_size: int
    target_revision: str | None = None
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    # benchmark name -> mean accepted tokens per verify step (SGLang's accept length, bonus token included)
    accept_length: dict[str, float] = field(default_factory=dict)
    training_data: list[str] = field(default_factory=list)
    recipe: str | None = None
    trained: bool = True
    license: str = "apache-2.0"
    name: str | None = None
    description: str | None = None
    # file name -> {"sha256": hex, "size": bytes}; bundle.json itself is not listed
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.target_id, str) or not self.target_id:
            raise BundleError("bundle metadata 'target.id' must be a non-empty string")
        if isinstance(self.speculative, dict):
            self.speculative = SpeculativeConfig(**self.speculative)
        if len(self.aux_layer_ids) != 3 or not all(isinstance(i, int) and i >= 0 for i in self.aux_layer_ids):
            raise BundleError(
                f"bundle metadata 'aux_layer_ids' must be 3 non-negative layer ids, got {self.aux_layer_ids}"
            )
        if not isinstance(self.draft_vocab_size, int) or self.draft_vocab_size <= 0:
            raise BundleError(
                f"bundle metadata 'draft_vocab_size' must be a positive integer, got {self.draft_vocab_size}"
            )
        for name, entry in self.files.items():
            check_member_name(name)
            if not isinstance(entry, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256", ""))):
                raise BundleError(f"bundle metadata entry for '{name}' has no valid sha256")

    def to_dict(self) -> dict:
        data = {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "target": {"id": self.target_id, "revision": self.target_revision},
            "aux_layer_ids": list(self.aux_layer_ids),
            "draft_vocab_size": self.draft_vocab_size,
            "speculative": asdict(self.speculative),
            "accept_length": dict(self.accept_length),
            "training": {"data": list(self.training_data), "recipe": self.recipe},
            "trained": self.trained,
            "license": self.license,
            "files": {k: dict(v) for k, v in sorted(self.files.items())},
        }
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BundleMetadata:
        if not isinstance(data, dict):
            raise BundleError(f"{METADATA_NAME} must hold a JSON object")
        if data.get("format", FORMAT) != FORMAT:
            raise BundleError(f"{METADATA_NAME} has format {data.get('format')!r}; this version reads {FORMAT!r}")
        target = data.get("target")
        if not isinstance(target, dict) or "id" not in target:
            raise BundleError(f"{METADATA_NAME} is missing 'target.id'")
        missing = [k for k in ("aux_layer_ids", "draft_vocab_size") if k not in data]
        if missing:
            raise BundleError(f"{METADATA_NAME} is missing field(s): {', '.join(missing)}")
        training = data.get("training") or {}
        files = data.get("files") or {}
        if not isinstance(files, dict):
            raise BundleError(f"{METADATA_NAME} 'files' must map file names to their sha256")
        return cls(
            target_id=target["id"],
            target_revision=target.get("revision"),
            aux_layer_ids=list(data["aux_layer_ids"]),
            draft_vocab_size=data["draft_vocab_size"],
            speculative=SpeculativeConfig(**(data.get("speculative") or {})),
            accept_length={str(k): float(v) for k, v in (data.get("accept_length") or {}).items()},
            training_data=list(training.get("data") or []),
            recipe=training.get("recipe"),
            trained=bool(data.get("trained", True)),
            license=data.get("license") or "apache-2.0",
            name=data.get("name"),
            description=data.get("description"),
            files=files,
        )

    @classmethod
    def from_file(cls, folder: str | Path) -> BundleMetadata:
        path = Path(folder) / METADATA_NAME
        if path.is_symlink() and not _link_allowed(Path(folder), path):
            raise BundleError(f"{path} is a symlink leaving the bundle folder")
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise BundleError(f"bundle metadata {path} not found") from e
        except json.JSONDecodeError as e:
            raise BundleError(f"bundle metadata {path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / METADATA_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def check_member_name(name: str) -> str:
    """A file name from a bundle or repo, accepted only if it stays inside the bundle folder."""
    if not isinstance(name, str) or not name:
        raise BundleError(f"bundle file name {name!r} is empty or not a string")
    if name.startswith("/") or "\\" in name or re.match(r"[A-Za-z]:", name):
        raise BundleError(f"bundle file name {name!r} is an absolute path: it would escape the bundle folder")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"bundle file name {name!r} contains '..' or empty parts: it would escape the bundle folder")
    bad = [p for p in parts if not _COMPONENT.fullmatch(p)]
    if bad:
        raise BundleError(f"bundle file name {name!r} has unsupported characters in {bad[0]!r}")
    if name == METADATA_NAME:
        raise BundleError(f"{METADATA_NAME} cannot list itself")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise BundleError(f"bundle file '{name}' is a pickle-format file; bundles carry safetensors only")
    return name


def _cache_repo_root(folder: Path) -> Path | None:
    """`<cache>/models--org--name` when `folder` is a Hugging Face cache snapshot (`.../snapshots/<commit>`)."""
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.parent.parent
    return None


def _link_allowed(folder: Path, path: Path) -> bool:
    root = _cache_repo_root(folder)
    if root is None:
        return False
    target = path.resolve()
    return target.is_relative_to((root / "blobs").resolve())


def member_path(folder: str | Path, name: str) -> Path:
    """The path of a listed file, refusing names or symlinks that leave the bundle folder."""
    folder = Path(folder)
    check_member_name(name)
    path = folder / name
    # Each component is checked so a symlinked sub-folder cannot redirect a file either.
    current = folder
    for part in name.split("/"):
        current = current / part
        if current.is_symlink() and not _link_allowed(folder, current):
            raise BundleError(f"bundle file '{name}' is a symlink ({current} -> {current.readlink()}); refused")
    if not path.resolve().is_relative_to(folder.resolve()) and not _link_allowed(folder, path):
        raise BundleError(f"bundle file '{name}' resolves outside the bundle folder {folder}")
    return path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def bundle_files(folder: str | Path) -> list[str]:
    """The files a bundle folder publishes: everything except bundle.json and hidden entries (e.g. `.cache/`)."""
    folder = Path(folder)
    names = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(p.startswith(".") for p in rel.parts) or rel.as_posix() == METADATA_NAME:
            continue
        if path.is_symlink():
            raise BundleError(f"bundle folder {folder} contains a symlink ({rel}); bundles hold plain files only")
        if path.is_file():
            names.append(check_member_name(rel.as_posix()))
    return names


def record_hashes(folder: str | Path, meta: BundleMetadata) -> BundleMetadata:
    """Set `meta.files` to the sha256 and size of every file in the folder (the publisher's act; see seal_bundle)."""
    folder = Path(folder)
    meta.files = {
        name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}
        for name in bundle_files(folder)
    }
    return meta


def check_hashes(folder: str | Path, meta: BundleMetadata, skip: tuple[str, ...] = ()) -> None:
    """Every listed file exists with the recorded size and sha256; otherwise BundleError naming the file."""
    folder = Path(folder)
    if not meta.files:
        raise BundleError(f"{folder / METADATA_NAME} lists no files: nothing can be verified")
    for name in (CONFIG_NAME,):
        if name not in meta.files:
            raise BundleError(f"{folder / METADATA_NAME} does not list '{name}'")
    if not any(name.endswith(".safetensors") for name in meta.files):
        raise BundleError(f"{folder / METADATA_NAME} lists no .safetensors weights")
    for name, entry in sorted(meta.files.items()):
        if name in skip:
            continue
        path = member_path(folder, name)
        if not path.is_file():
            raise BundleError(f"bundle file '{name}' listed in {METADATA_NAME} is missing from {folder}")
        size = path.stat().st_size
        if "size" in entry and size != entry["size"]:
            # A size mismatch settles the hash check without reading the file.
            raise BundleError(
                f"bundle file '{name}' fails its sha256 check: it has {size} bytes, {METADATA_NAME} records "
                f"{entry['size']}"
            )
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleError(
                f"bundle file '{name}' fails its sha256 check: {METADATA_NAME} records {entry['sha256']}, "
                f"the file hashes to {digest}"
            )


@dataclass
class TargetInfo:
    """What a draft must agree with; None marks what is unknown (e.g. only the Hub id of a target is at hand)."""

    id: str | None
    hidden_size: int | None = None
    vocab_size: int | None = None
    num_hidden_layers: int | None = None

    @classmethod
    def from_config(cls, config, target_id: str | None = None) -> TargetInfo:
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        missing = [k for k in ("hidden_size", "vocab_size", "num_hidden_layers") if get(k) is None]
        if missing:
            raise BundleError(f"target config for {target_id or 'the target'} has no {', '.join(missing)}")
        return cls(target_id, int(get("hidden_size")), int(get("vocab_size")), int(get("num_hidden_layers")))


@dataclass
class VerifyReport:
    folder: Path
    config: DraftConfig
    metadata: BundleMetadata | None
    checks: list[str] = field(default_factory=list)


def verify_bundle(folder: str | Path, target: TargetInfo | None = None, require_metadata: bool = False) -> VerifyReport:
    """Hashes, checkpoint keys/shapes, metadata vs config.json, and (given a target) hidden size, vocabulary, layers.

    A folder without bundle.json is a plain SGLang/SpecForge checkpoint: its structure is checked, its hashes cannot be.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"bundle folder {folder} does not exist")
    checks = []
    meta = None
    has_meta = (folder / METADATA_NAME).exists() or (folder / METADATA_NAME).is_symlink()
    if has_meta:
        meta = BundleMetadata.from_file(folder)
        check_hashes(folder, meta)
        # load_draft reads every *.safetensors in the folder, so an unlisted one would be loaded unverified.
        unlisted = sorted(p.name for p in folder.glob("*.safetensors") if p.name not in meta.files)
        if unlisted:
            raise BundleError(f"bundle file(s) {', '.join(unlisted)} in {folder} are not listed in {METADATA_NAME}")
        checks.append(f"sha256 of {len(meta.files)} file(s) match {METADATA_NAME}")
    elif require_metadata:
        raise BundleError(f"bundle {folder} has no {METADATA_NAME}")
    else:
        checks.append(f"no {METADATA_NAME}: file hashes not checked (plain SGLang/SpecForge checkpoint)")
        for name in [CONFIG_NAME, *(p.name for p in folder.glob("*.safetensors"))]:
            member_path(folder, name)
    from specbundle.checkpoint import validate_checkpoint  # imports torch: only when a checkpoint is checked

    try:
        cfg = validate_checkpoint(folder)
    except DraftConfigError as e:
        raise BundleError(f"bundle {folder}: {e}") from e
    checks.append("checkpoint keys and shapes match config.json")
    if meta is not None:
        if meta.draft_vocab_size != cfg.effective_draft_vocab_size:
            raise BundleError(
                f"{METADATA_NAME} 'draft_vocab_size' is {meta.draft_vocab_size} but config.json gives "
                f"{cfg.effective_draft_vocab_size}"
            )
        if cfg.aux_layer_ids is not None and list(cfg.aux_layer_ids) != list(meta.aux_layer_ids):
            raise BundleError(
                f"{METADATA_NAME} 'aux_layer_ids' {meta.aux_layer_ids} disagree with config.json's "
                f"eagle_aux_hidden_state_layer_ids {cfg.aux_layer_ids}"
            )
        checks.append("bundle metadata agrees with config.json")
    if target is not None:
        checks.append(check_target(cfg, meta, target))
    return VerifyReport(folder, cfg, meta, checks)


def check_target(cfg: DraftConfig, meta: BundleMetadata | None, target: TargetInfo) -> str:
    """Raise BundleError ("target mismatch: ...") unless the draft fits the target; returns what was checked."""
    name = f"target '{target.id}'" if target.id else "the target"
    if meta is not None and target.id is not None and target.id.lower() != meta.target_id.lower():
        raise BundleError(f"target mismatch: the bundle is for '{meta.target_id}', not '{target.id}'")
    checked = [f"target id {target.id}"] if target.id and meta is not None else []
    if target.hidden_size is not None:
        for field_name, value in (("target_hidden_size", cfg.target_hidden_size), ("hidden_size", cfg.hidden_size)):
            if value != target.hidden_size:
                raise BundleError(
                    f"target mismatch: draft '{field_name}' is {value} but {name} has hidden size {target.hidden_size}"
                )
        checked.append(f"hidden size {target.hidden_size}")
    if target.vocab_size is not None:
        if cfg.vocab_size != target.vocab_size:
            raise BundleError(
                f"target mismatch: draft 'vocab_size' is {cfg.vocab_size} but {name} has vocabulary size "
                f"{target.vocab_size}"
            )
        checked.append(f"vocabulary {target.vocab_size}")
    if target.num_hidden_layers is not None:
        n = target.num_hidden_layers
        if cfg.aux_layer_ids is None and meta is not None and list(meta.aux_layer_ids) != default_aux_layer_ids(n):
            raise BundleError(
                f"target mismatch: config.json names no aux layers, so a server uses the default "
                f"{default_aux_layer_ids(n)} for a {n}-layer target, but the draft was trained on {meta.aux_layer_ids}"
            )
        layer_ids = cfg.aux_layer_ids or default_aux_layer_ids(n)
        bad = [i for i in layer_ids if not 0 <= i < n]
        if bad:
            raise BundleError(f"target mismatch: aux layer ids {bad} do not exist in the {n} layers of {name}")
        checked.append(f"aux layers {list(layer_ids)} of {n}")
    return "target agrees: " + (", ".join(checked) or "nothing known about it to check")


def seal_bundle(folder: str | Path, meta: BundleMetadata | None = None) -> BundleMetadata:
    """Write the model card and bundle.json (with fresh hashes of every file) into a checkpoint folder."""
    from specbundle.card import write_card

    folder = Path(folder)
    meta = meta or BundleMetadata.from_file(folder)
    cfg = DraftConfig.from_file(folder)
    if meta.draft_vocab_size != cfg.effective_draft_vocab_size:
        raise BundleError(
            f"bundle metadata 'draft_vocab_size' is {meta.draft_vocab_size} but config.json gives "
            f"{cfg.effective_draft_vocab_size}"
        )
    write_card(folder, meta)
    record_hashes(folder, meta)
    meta.save(folder)
    return meta
