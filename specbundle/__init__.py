"""EAGLE-3 draft-checkpoint bundles: config, the draft model, vocabulary maps, safetensors I/O and Hub traffic."""

from specbundle.config import DraftConfig, DraftConfigError
from specbundle.modeling import Eagle3DraftModel

__all__ = ["DraftConfig", "DraftConfigError", "Eagle3DraftModel"]
