"""The draft checkpoint's config.json, as SGLang's `LlamaForCausalLMEagle3` and SpecForge read it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURE = "LlamaForCausalLMEagle3"


class DraftConfigError(ValueError):
    """A draft config or checkpoint that cannot be used; the message names the field or key at fault."""


def default_aux_layer_ids(num_target_layers: int) -> list[int]:
    """EAGLE-3's default: low, middle and high target layers (0-indexed outputs)."""
    return [1, num_target_layers // 2 - 1, num_target_layers - 4]


@dataclass
class DraftConfig:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    draft_vocab_size: int | None = None
    target_hidden_size: int | None = None
    head_dim: int | None = None
    num_hidden_layers: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    torch_dtype: str = "bfloat16"
    aux_layer_ids: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DraftConfigError(f"draft config field '{name}' must be a positive integer, got {value!r}")
        if self.num_hidden_layers != 1:
            raise DraftConfigError(
                f"draft config 'num_hidden_layers' must be 1 for EAGLE-3, got {self.num_hidden_layers}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise DraftConfigError(
                f"draft config 'num_attention_heads' ({self.num_attention_heads}) is not a multiple of "
                f"'num_key_value_heads' ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise DraftConfigError("draft config 'hidden_size' is not divisible by 'num_attention_heads'")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.draft_vocab_size is not None and not (0 < self.draft_vocab_size <= self.vocab_size):
            raise DraftConfigError(
                f"draft config 'draft_vocab_size' ({self.draft_vocab_size}) must be in "
                f"[1, vocab_size={self.vocab_size}]"
            )
        if self.target_hidden_size is None:
            self.target_hidden_size = self.hidden_size
        if self.hidden_act != "silu":
            raise DraftConfigError(f"draft config 'hidden_act' must be 'silu', got {self.hidden_act!r}")
        if self.aux_layer_ids is not None and len(self.aux_layer_ids) != 3:
            raise DraftConfigError(
                "draft config 'eagle_config.eagle_aux_hidden_state_layer_ids' must name 3 layers, "
                f"got {self.aux_layer_ids}"
            )

    @property
    def effective_draft_vocab_size(self) -> int:
        return self.draft_vocab_size or self.vocab_size

    def resolved_aux_layer_ids(self, num_target_layers: int) -> list[int]:
        ids = self.aux_layer_ids or default_aux_layer_ids(num_target_layers)
        bad = [i for i in ids if not 0 <= i < num_target_layers]
        if bad:
            raise DraftConfigError(f"aux layer ids {bad} are outside the target's {num_target_layers} layers")
        return list(ids)

    @classmethod
    def from_dict(cls, data: dict) -> DraftConfig:
        if not isinstance(data, dict):
            raise DraftConfigError("draft config.json must hold a JSON object")
        archs = data.get("architectures")
        if archs is not None and ARCHITECTURE not in archs:
            raise DraftConfigError(f"draft config 'architectures' is {archs}, expected ['{ARCHITECTURE}']")
        missing = [
            k for k in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size") if k not in data
        ]
        if missing:
            raise DraftConfigError(f"draft config is missing required field(s): {', '.join(missing)}")
        eagle = data.get("eagle_config") or {}
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "aux_layer_ids")}
        kwargs = {k: data[k] for k in known if k in data and data[k] is not None}
        kwargs.setdefault("num_key_value_heads", data["num_attention_heads"])
        extra = {k: v for k, v in data.items() if k not in known and k != "eagle_config"}
        return cls(**kwargs, aux_layer_ids=eagle.get("eagle_aux_hidden_state_layer_ids"), extra=extra)

    @classmethod
    def from_file(cls, path: str | Path) -> DraftConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise DraftConfigError(f"draft config not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DraftConfigError(f"draft config {path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        data = {k: v for k, v in asdict(self).items() if k not in ("extra", "aux_layer_ids")}
        data.update(self.extra)
        data["architectures"] = [ARCHITECTURE]
        data["model_type"] = "llama"
        if data["rope_scaling"] is None:
            del data["rope_scaling"]
        if self.aux_layer_ids is not None:
            data["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids)}
        return data

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def for_target(cls, target_config, draft_vocab_size: int | None = None, aux_layer_ids=None) -> DraftConfig:
        """A draft shaped like the target's layers (a transformers PretrainedConfig or a dict)."""
        get = target_config.get if isinstance(target_config, dict) else lambda k, d=None: getattr(target_config, k, d)
        heads = get("num_attention_heads")
        return cls(
            hidden_size=get("hidden_size"),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads") or heads,
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            draft_vocab_size=draft_vocab_size,
            target_hidden_size=get("hidden_size"),
            head_dim=get("head_dim") or get("hidden_size") // heads,
            rms_norm_eps=get("rms_norm_eps", 1e-6),
            rope_theta=_rope_theta(target_config),
            rope_scaling=_rope_scaling(target_config),
            max_position_embeddings=get("max_position_embeddings", 2048),
            aux_layer_ids=list(aux_layer_ids) if aux_layer_ids is not None else None,
        )


def _rope_theta(cfg) -> float:
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    params = get("rope_parameters") or {}
    return float(get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg):
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    scaling = get("rope_scaling") or get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    return {k: v for k, v in scaling.items() if k != "rope_theta"}
