"""EAGLE-3 draft-checkpoint bundles: config, the draft model, vocabulary maps, safetensors I/O and Hub traffic."""

from specbundle.config import DraftConfig, DraftConfigError

__all__ = ["DraftConfig", "DraftConfigError", "Eagle3DraftModel"]


def __getattr__(name: str):
    # torch loads on first use of the model, so `specbundle list` / `--help` and config-only users start fast.
    if name == "Eagle3DraftModel":
        from specbundle.modeling import Eagle3DraftModel

        return Eagle3DraftModel
    raise AttributeError(f"module 'specbundle' has no attribute {name!r}")
