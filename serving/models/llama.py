"""Llama-family decoder (Llama 2/3, SmolLM2, Qwen2 with QKV bias, Qwen3 with QK-norm), one definition.

Weights keep transformers' names; q/k/v and gate/up are fused at load for fewer, larger matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from serving.forward_batch import ForwardBatch
from specbundle.config import _rope_scaling, _rope_theta
from specbundle.layers import RMSNorm, RotaryEmbedding, linear


@dataclass
class TargetConfig:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    attention_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf) -> TargetConfig:
        model_type = hf.model_type
        if model_type not in ("llama", "qwen2", "qwen3", "mistral"):
            raise ValueError(f"unsupported target architecture {model_type!r} (llama, qwen2, qwen3, mistral)")
        heads = hf.num_attention_heads
        return cls(
            model_type=model_type,
            hidden_size=hf.hidden_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
            intermediate_size=hf.intermediate_size,
            vocab_size=hf.vocab_size,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=_rope_theta(hf),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=hf.max_position_embeddings,
            attention_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        )


class Attention(nn.Module):
    def __init__(self, cfg: TargetConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, positions, fb: ForwardBatch, rotary, backend, fused: bool = False):
        qkv = linear(x, self.qkv_proj.weight, self.qkv_proj.bias)
        out = self.attend(qkv, positions, fb, rotary, backend, fused)
        return linear(out, self.o_proj.weight)

    def attend(self, qkv, positions, fb: ForwardBatch, rotary, backend, fused: bool = False):
        """qkv [N, q_size + 2 * kv_size] -> attention output [N, q_size] (before o_proj)."""
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)  # [N, Hq, D]: strided views into the qkv output
        k = k.view(n, self.num_kv_heads, self.head_dim)  # [N, Hkv, D]
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if fused:
            # In place, and the same launch stores the rotated k and v in the KV cache.
            kernels.apply_rope(
                q, k, positions, rotary.cos_sin, v=v, k_buffer=backend.k_cache[self.layer_id],
                v_buffer=backend.v_cache[self.layer_id], loc=fb.out_cache_loc,
            )  # fmt: skip
            out = backend.forward(q, k, v, self.layer_id, fb, kv_stored=True)  # [N, Hq, D]
        else:
            q, k = rotary(positions, q, k)
            out = backend.forward(q, k, v, self.layer_id, fb)
        return out.reshape(n, self.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, fused: bool = False):
        if fused:
            return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x)))
        gate, up = linear(x, self.gate_up_proj.weight).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TargetConfig, layer_id: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: TargetConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        # Triton kernels for the norms, RoPE (+ KV store) and SiLU-and-mul (set on CUDA by the model runner): about 9
        # launches per layer instead of about 40 with the torch ops, with the same rounding.
        self.fused_kernels = False
        # With fused_kernels, forwards of at most kernels.gemv.MAX_ROWS tokens run each linear as one fused
        # few-row kernel (norm prologue, SiLU-and-mul or residual epilogue): 5 launches per layer. The model runner
        # sets it for models whose layers are small enough that launches, not weight reads, bound a decode step.
        self.fused_gemv = False

    def forward(self, fb: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (final normed hidden [N, H], aux hidden [N, 3*H] or None)."""
        h = self.embed_tokens(fb.input_ids)  # [N, H]
        if self.fused_kernels and self.fused_gemv and h.shape[0] <= kernels.GEMV_MAX_ROWS:
            return self._forward_few_rows(fb, h)
        if self.fused_kernels:
            return self._forward_fused(fb, h)
        positions = fb.positions
        aux = {}
        capture = set(fb.aux_layer_ids)
        residual = None
        for i, layer in enumerate(self.layers):
            if residual is None:
                residual = h
            else:
                residual = residual + h
            x = layer.input_layernorm(residual)
            x = layer.self_attn(x, positions, fb, self.rotary, fb.attn_backend)
            residual = residual + x
            h = layer.mlp(layer.post_attention_layernorm(residual))
            if i in capture:
                aux[i] = residual + h  # output of layer i
        hidden = self.norm(residual + h)
        return hidden, self._aux(aux, fb)

    def _forward_fused(self, fb: ForwardBatch, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same layer math with fused kernels: residual adds happen inside the norms, in place."""
        positions, eps = fb.positions, self.config.rms_norm_eps
        aux = {}
        capture = set(fb.aux_layer_ids)
        residual = h
        x = kernels.rms_norm(h, self.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(self.layers):
            if i > 0:
                x, residual = kernels.fused_add_rms_norm(h, residual, layer.input_layernorm.weight, eps)
            a = layer.self_attn(x, positions, fb, self.rotary, fb.attn_backend, fused=True)
            x, residual = kernels.fused_add_rms_norm(a, residual, layer.post_attention_layernorm.weight, eps)
            h = layer.mlp(x, fused=True)
            if i in capture:
                aux[i] = residual + h  # output of layer i
        hidden, _ = kernels.fused_add_rms_norm(h, residual, self.norm.weight, eps)
        return hidden, self._aux(aux, fb)

    def _forward_few_rows(self, fb: ForwardBatch, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same layer math for a few tokens: the residual stream is updated in place by the linears' epilogues
        and every norm runs inside the linear that reads it."""
        positions, eps = fb.positions, self.config.rms_norm_eps
        aux = {}
        capture = set(fb.aux_layer_ids)
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            qkv = kernels.fused_linear(
                residual, attn.qkv_proj.weight, attn.qkv_proj.bias, norm_weight=layer.input_layernorm.weight, eps=eps
            )
            out = attn.attend(qkv, positions, fb, self.rotary, fb.attn_backend, fused=True)
            kernels.fused_linear(out, attn.o_proj.weight, residual=residual)
            act = kernels.fused_linear(
                residual, layer.mlp.gate_up_proj.weight, norm_weight=layer.post_attention_layernorm.weight, eps=eps,
                silu_mul=True,
            )  # fmt: skip
            kernels.fused_linear(act, layer.mlp.down_proj.weight, residual=residual)
            if i in capture:
                aux[i] = residual.clone()  # output of layer i; the stream is updated in place afterwards
        return kernels.rms_norm(residual, self.norm.weight, eps), self._aux(aux, fb)

    @staticmethod
    def _aux(aux: dict, fb: ForwardBatch) -> torch.Tensor | None:
        if not aux:
            return None
        return torch.cat([aux[i] for i in fb.aux_layer_ids], dim=-1)  # [N, 3*H]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head.weight).float()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load transformers-named weights, fusing q/k/v and gate/up; errors name the missing key."""
        cfg = self.config

        def take(name):
            if name not in state:
                raise KeyError(f"target checkpoint is missing weight '{name}'")
            return state[name]

        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # re-tie: meta init + to_empty unties
        with torch.no_grad():
            self.embed_tokens.weight.copy_(take("model.embed_tokens.weight"))
            self.norm.weight.copy_(take("model.norm.weight"))
            if not cfg.tie_word_embeddings:
                self.lm_head.weight.copy_(state.get("lm_head.weight", state["model.embed_tokens.weight"]))
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                attn = layer.self_attn
                attn.qkv_proj.weight.copy_(torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"]))
                if cfg.attention_bias:
                    attn.qkv_proj.bias.copy_(torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"]))
                attn.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
                if cfg.qk_norm:
                    attn.q_norm.weight.copy_(take(p + "self_attn.q_norm.weight"))
                    attn.k_norm.weight.copy_(take(p + "self_attn.k_norm.weight"))
                gate, up = take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")
                layer.mlp.gate_up_proj.weight.copy_(torch.cat([gate, up]))
                layer.mlp.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
                layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
                layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
