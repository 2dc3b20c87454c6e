"""The frozen target LLM: any architecture transformers loads, with its aux hidden states captured.

Aux hidden state i is the *output* of decoder layer i (0-indexed), i.e. `hidden_states[i + 1]` of
`output_hidden_states=True`; we capture it with forward hooks so the other layers' states are never kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from specbundle.config import default_aux_layer_ids


class TargetModelError(ValueError):
    """A target model that cannot be loaded or used for EAGLE-3 training."""


@dataclass
class TargetOutput:
    aux_hidden: torch.Tensor  # [B, T, 3*H] outputs of the three aux layers, concatenated
    last_hidden: torch.Tensor  # [B, T, H] the final-norm output that the lm_head reads
    logits: torch.Tensor | None  # [B, T, V]; None when only the hidden states were asked for


def split_model_path(path: str | Path) -> tuple[str, str | None]:
    """'dir/model.gguf' -> ('dir', 'model.gguf'); anything else (folder or Hub id) -> (path, None)."""
    path = str(path)
    if path.endswith(".gguf"):
        p = Path(path)
        if not p.is_file():
            raise TargetModelError(f"GGUF target file not found: {p}")
        return str(p.parent), p.name
    return path, None


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' (or None) means bf16 on GPU and fp32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "float32": torch.float32, "fp32": torch.float32}
    if dtype not in table:
        raise TargetModelError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(table)}")
    return table[dtype]


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    folder, gguf_file = split_model_path(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)


def load_target_config(path: str | Path):
    """The target's (text) config without loading weights."""
    from transformers import AutoConfig

    folder, gguf_file = split_model_path(path)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as e:
        raise TargetModelError(f"cannot load the config of target {path!r}: {e}") from e
    return getattr(cfg, "text_config", None) or cfg


def _decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for holder in (decoder, getattr(model, "model", None), model):
        layers = getattr(holder, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    return None


class TargetModel:
    """Wraps a frozen `AutoModelForCausalLM`; `forward` returns what EAGLE-3 training needs from it."""

    def __init__(self, model: nn.Module, aux_layer_ids: list[int] | None = None):
        self.model = model.eval().requires_grad_(False)
        self.config = getattr(model.config, "text_config", None) or model.config
        self.num_layers = int(self.config.num_hidden_layers)
        self.aux_layer_ids = (list(aux_layer_ids) if aux_layer_ids is not None
                              else default_aux_layer_ids(self.num_layers))
        if len(self.aux_layer_ids) != 3:
            raise TargetModelError(f"EAGLE-3 needs exactly 3 aux layer ids, got {self.aux_layer_ids}")
        bad = [i for i in self.aux_layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise TargetModelError(f"aux layer ids {bad} are outside the target's {self.num_layers} layers")
        self._layers = _decoder_layers(model)
        if self._layers is not None and len(self._layers) != self.num_layers:
            self._layers = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype | None = "auto",
        device: str | torch.device | None = None,
        aux_layer_ids: list[int] | None = None,
        device_map: str | None = None,
        max_memory: dict | None = None,
    ) -> TargetModel:
        """Load a target (folder, Hub id or .gguf file); never runs remote code."""
        from transformers import AutoModelForCausalLM

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = resolve_dtype(dtype, device)
        folder, gguf_file = split_model_path(path)
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        if device_map is not None:
            kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, trust_remote_code=False, **kwargs)
        except (OSError, ValueError) as e:
            raise TargetModelError(f"cannot load target model {path!r}: {e}") from e
        if device_map is None:
            model = model.to(device=device, dtype=torch_dtype)
        return cls(model, aux_layer_ids)

    def config_dict(self) -> dict:
        """The target's (text) config as plain JSON values."""
        import json

        return json.loads(self.config.to_json_string(use_diff=False))

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    def embed_weight(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight  # [V, H]

    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight  # [V, H]

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids.to(self.device))

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_logits: bool = True) -> TargetOutput:
        """input_ids/attention_mask [B, T] (right-padded) -> aux [B, T, 3H], last hidden [B, T, H], logits [B, T, V]."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        head = self.model.get_output_embeddings()
        handles.append(head.register_forward_pre_hook(lambda m, args: captured.__setitem__("last", args[0])))
        if self._layers is not None:
            for i in self.aux_layer_ids:
                def hook(module, args, output, i=i):
                    captured[f"aux{i}"] = output[0] if isinstance(output, tuple) else output
                handles.append(self._layers[i].register_forward_hook(hook))
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        # Without logits the decoder alone runs: its last_hidden_state is the final-norm output the head reads.
        decoder_only = not with_logits and self._layers is not None and decoder is not None
        try:
            out = (decoder if decoder_only else self.model)(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                output_hidden_states=self._layers is None,
                use_cache=False,
            )
        finally:
            for h in handles:
                h.remove()
        if self._layers is None:
            aux = [out.hidden_states[i + 1] for i in self.aux_layer_ids]
        else:
            aux = [captured[f"aux{i}"] for i in self.aux_layer_ids]
        return TargetOutput(
            aux_hidden=torch.cat([a.to(aux[0].device) for a in aux], dim=-1),  # layers may sit on several GPUs
            last_hidden=out.last_hidden_state if decoder_only else captured["last"],
            logits=out.logits if with_logits else None,
        )

    __call__ = forward
