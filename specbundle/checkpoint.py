"""Draft checkpoint I/O: `config.json` + `model.safetensors` (safetensors only; no pickle is ever loaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specbundle.config import DraftConfig, DraftConfigError
from specbundle.modeling import Eagle3DraftModel

WEIGHTS_NAME = "model.safetensors"
# Keys some producers add that the draft does not use (the target's embedding is shared).
IGNORED_KEYS = ("embed_tokens.weight", "model.embed_tokens.weight")


def expected_shapes(cfg: DraftConfig, with_lm_head: bool = True) -> dict[str, tuple[int, ...]]:
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes = {
        "fc.weight": (h, 3 * cfg.target_hidden_size),
        "midlayer.self_attn.q_proj.weight": (q, 2 * h),
        "midlayer.self_attn.k_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": (kv, 2 * h),
        "midlayer.self_attn.o_proj.weight": (h, q),
        "midlayer.mlp.gate_proj.weight": (cfg.intermediate_size, h),
        "midlayer.mlp.up_proj.weight": (cfg.intermediate_size, h),
        "midlayer.mlp.down_proj.weight": (h, cfg.intermediate_size),
        "midlayer.hidden_norm.weight": (h,),
        "midlayer.input_layernorm.weight": (h,),
        "midlayer.post_attention_layernorm.weight": (h,),
        "norm.weight": (h,),
    }
    if with_lm_head:
        shapes["lm_head.weight"] = (cfg.effective_draft_vocab_size, h)
        shapes["d2t"] = (cfg.effective_draft_vocab_size,)
        shapes["t2d"] = (cfg.vocab_size,)
    return shapes


def _normalize_key(key: str) -> str:
    # Some exports prefix everything with "model." (or name the layer midlayers.0).
    if key.startswith("model.") and key not in IGNORED_KEYS:
        key = key[len("model.") :]
    return key.replace("midlayers.0.", "midlayer.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DraftConfigError(f"no safetensors weights found in {path} (pickle checkpoints are not loaded)")
    state = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    state[_normalize_key(key)] = fh.get_tensor(key)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise DraftConfigError(f"cannot read safetensors file {f}: {e}") from e
    return state


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from the safetensors headers only (no tensor data is read)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise DraftConfigError(f"no safetensors weights found in {path} (pickle checkpoints are not loaded)")
    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    shapes[_normalize_key(key)] = tuple(fh.get_slice(key).get_shape())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise DraftConfigError(f"cannot read safetensors file {f}: {e}") from e
    return shapes


def _check_config_against_target(cfg: DraftConfig, target_hidden_size: int | None, target_vocab_size: int | None):
    if target_hidden_size is not None and cfg.target_hidden_size != target_hidden_size:
        raise DraftConfigError(
            f"draft 'target_hidden_size' is {cfg.target_hidden_size} "
            f"but the target's hidden size is {target_hidden_size}"
        )
    if target_vocab_size is not None and cfg.vocab_size != target_vocab_size:
        raise DraftConfigError(
            f"draft 'vocab_size' is {cfg.vocab_size} but the target's vocabulary is {target_vocab_size}"
        )


def _check_keys_and_shapes(folder: Path, cfg: DraftConfig, state_shapes: dict[str, tuple[int, ...]]) -> bool:
    """Raise DraftConfigError on any missing/unexpected key or wrong shape; returns whether an lm_head is present."""
    has_head = "lm_head.weight" in state_shapes
    shapes = expected_shapes(cfg, with_lm_head=has_head)
    if has_head and cfg.effective_draft_vocab_size == cfg.vocab_size:
        # Full-vocabulary head: the maps are optional (identity).
        for key in ("d2t", "t2d"):
            if key not in state_shapes:
                shapes.pop(key)
    missing = [k for k in shapes if k not in state_shapes]
    if missing:
        raise DraftConfigError(f"draft checkpoint {folder} is missing key(s): {', '.join(missing)}")
    unexpected = [k for k in state_shapes if k not in shapes and k not in IGNORED_KEYS]
    if unexpected:
        raise DraftConfigError(f"draft checkpoint {folder} has unexpected key(s): {', '.join(unexpected)}")
    for key, shape in shapes.items():
        if tuple(state_shapes[key]) != shape:
            raise DraftConfigError(
                f"draft checkpoint key '{key}' has shape {tuple(state_shapes[key])}, expected {shape} from config.json"
            )
    return has_head


def validate_checkpoint(
    folder: str | Path, target_hidden_size: int | None = None, target_vocab_size: int | None = None
) -> DraftConfig:
    """load_draft's checks (config, keys, shapes, target sizes) from the headers alone, without loading weights."""
    folder = Path(folder)
    cfg = DraftConfig.from_file(folder)
    _check_config_against_target(cfg, target_hidden_size, target_vocab_size)
    _check_keys_and_shapes(folder, cfg, read_shapes(folder))
    return cfg


def load_draft(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    target_hidden_size: int | None = None,
    target_vocab_size: int | None = None,
) -> Eagle3DraftModel:
    """Load and validate a draft checkpoint; every mismatch raises DraftConfigError naming the key or field."""
    folder = Path(folder)
    cfg = DraftConfig.from_file(folder)
    _check_config_against_target(cfg, target_hidden_size, target_vocab_size)
    state = read_state_dict(folder)
    for key in IGNORED_KEYS:
        state.pop(key, None)
    has_head = _check_keys_and_shapes(folder, cfg, {k: tuple(v.shape) for k, v in state.items()})
    model = Eagle3DraftModel(cfg)
    if not has_head:
        model.lm_head = None
    floats = {k: v.to(dtype) for k, v in state.items() if k not in ("d2t", "t2d")}
    model.load_state_dict(floats, strict=False)
    if "d2t" in state:
        d2t = state["d2t"].to(torch.int64)
        targets = d2t + torch.arange(d2t.numel())
        if targets.min() < 0 or targets.max() >= cfg.vocab_size:
            raise DraftConfigError("draft checkpoint 'd2t' maps draft ids outside the target vocabulary")
        model.d2t.copy_(d2t)
    if "t2d" in state:
        model.t2d.copy_(state["t2d"].to(torch.bool))
    return model.to(device=device, dtype=dtype).eval()


def save_draft(model: Eagle3DraftModel, folder: str | Path, dtype: torch.dtype | None = torch.bfloat16) -> Path:
    """Write config.json + model.safetensors in the SGLang/SpecForge layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("rotary."):
            continue
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous()
    cfg = model.config
    if dtype is not None:
        cfg.torch_dtype = str(dtype).removeprefix("torch.")
    cfg.save(folder)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    return folder
