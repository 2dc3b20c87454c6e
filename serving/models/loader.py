"""Target loading: local Hugging Face folder or Hub id (safetensors, sharded) and GGUF through transformers."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from serving.models.llama import LlamaForCausalLM, TargetConfig
from specbundle.assets import DEFAULT_TARGET_ID, smollm2_gguf_path

logger = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedTarget:
    model: LlamaForCausalLM
    tokenizer: object
    hf_config: object
    source: str  # what was asked for
    served_name: str  # the id clients use in "model"
    target_id: str  # the Hub id of the target where known (for bundle lookup)


def parse_dtype(name: str | torch.dtype, device) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _cache_root() -> Path:
    return Path(os.environ.get("SPECRAIL_CACHE", Path.home() / ".cache" / "specrail"))


def _gguf_to_folder(gguf: Path) -> Path:
    """Dequantize a GGUF once through transformers and keep it as a safetensors folder (later loads are fast)."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = _cache_root() / "gguf" / f"{gguf.stem}-{key}"
    if (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (once) into %s", gguf, out)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    hf.config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    state = {
        k: v.contiguous()
        for k, v in hf.state_dict().items()
        if k != "lm_head.weight" or not hf.config.tie_word_embeddings
    }
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf)}))
    if out.exists():  # another process converted it meanwhile
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, out)
    return out


def resolve_model_path(model: str | None) -> tuple[Path, str]:
    """(local folder, target Hub id) for a folder, a .gguf file, a Hub id, or None (the default SmolLM2)."""
    if model is None:
        return _gguf_to_folder(smollm2_gguf_path()), DEFAULT_TARGET_ID
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        target_id = DEFAULT_TARGET_ID if path.name == smollm2_gguf_path().name else path.stem
        return _gguf_to_folder(path), target_id
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return path, _hub_id_from_config(path) or path.name
    if path.exists():
        raise ValueError(f"--model {model} is neither a folder, a .gguf file nor a Hub id")
    from huggingface_hub import snapshot_download

    local = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    return Path(local), model


def _hub_id_from_config(folder: Path) -> str | None:
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = cfg.get("_name_or_path") or ""
    return name if name.count("/") == 1 and not Path(name).exists() else None


def read_safetensors_folder(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder} (pickle checkpoints are not loaded)")
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                state[k] = fh.get_tensor(k).to(dtype)
    return state


def load_target(model: str | None = None, dtype="auto", device="cpu", served_name: str | None = None) -> LoadedTarget:
    from transformers import AutoConfig, AutoTokenizer

    folder, target_id = resolve_model_path(model)
    hf_config = AutoConfig.from_pretrained(str(folder))
    cfg = TargetConfig.from_hf(hf_config)
    torch_dtype = parse_dtype(dtype, device)
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg)
    net = net.to_empty(device="cpu")
    net.rotary = type(net.rotary)(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
    net.load_hf_state_dict(read_safetensors_folder(folder, torch.float32))
    net = net.to(device=device, dtype=torch_dtype).eval()
    net.rotary.cos_sin = net.rotary.cos_sin.float()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    name = served_name or (target_id if model is None else str(model))
    return LoadedTarget(net, tokenizer, hf_config, str(model), name, target_id)


def target_from_hf_model(hf_model, tokenizer, device="cpu", dtype=torch.float32, name="test-model") -> LoadedTarget:
    """Wrap an in-memory transformers model (tests, tiny random targets)."""
    cfg = TargetConfig.from_hf(hf_model.config)
    net = LlamaForCausalLM(cfg)
    net.load_hf_state_dict({k: v.float() for k, v in hf_model.state_dict().items()})
    net = net.to(device=device, dtype=dtype).eval()
    net.rotary.cos_sin = net.rotary.cos_sin.float()
    return LoadedTarget(net, tokenizer, hf_model.config, name, name, name)
