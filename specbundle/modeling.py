"""The one EAGLE-3 draft model (SGLang `LlamaForCausalLMEagle3` / SpecForge `llama3_eagle` layout).

Attention is injected: `forward(..., attn_fn, attn_ctx)` calls `attn_fn(q, k, v, attn_ctx)` with rotated
q [N, Hq, D], k/v [N, Hkv, D] and expects [N, Hq, D]. The server passes its KV-cache backend, the trainer its
training-time-test cache; nothing here knows which.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from specbundle.config import DraftConfig
from specbundle.layers import RMSNorm, RotaryEmbedding, linear

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


class DraftAttention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        in_dim = 2 * cfg.hidden_size
        self.q_proj = nn.Linear(in_dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, positions, rotary: RotaryEmbedding, attn_fn: AttnFn, attn_ctx):
        n = x.shape[0]
        q = linear(x, self.q_proj.weight).view(n, self.num_heads, self.head_dim)
        k = linear(x, self.k_proj.weight).view(n, self.num_kv_heads, self.head_dim)
        v = linear(x, self.v_proj.weight).view(n, self.num_kv_heads, self.head_dim)
        q, k = rotary(positions, q, k)
        out = attn_fn(q, k, v, attn_ctx)  # [N, Hq, D]
        return linear(out.reshape(n, self.num_heads * self.head_dim), self.o_proj.weight)


class DraftMLP(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = linear(x, self.gate_proj.weight), linear(x, self.up_proj.weight)
        return linear(F.silu(gate) * up, self.down_proj.weight)


class DraftDecoderLayer(nn.Module):
    """Attention over cat(norm(embeds), norm(hidden)), then the usual MLP block."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.self_attn = DraftAttention(cfg)
        self.mlp = DraftMLP(cfg)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Eagle3DraftModel(nn.Module):
    """Parameters are named exactly as the checkpoint keys (`fc.weight`, `midlayer.*`, `norm.weight`, ...)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.config = cfg
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=bool(cfg.extra.get("bias", False)))
        self.midlayer = DraftDecoderLayer(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.draft_vocab_size = cfg.effective_draft_vocab_size
        # None when the checkpoint carries no lm_head: the target's is used (full vocabulary).
        self.lm_head: nn.Linear | None = nn.Linear(cfg.hidden_size, self.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(self.draft_vocab_size, dtype=torch.int64))
        self.register_buffer(
            "t2d",
            torch.ones(cfg.vocab_size, dtype=torch.bool)
            if cfg.draft_vocab_size is None
            else torch.zeros(cfg.vocab_size, dtype=torch.bool),
        )
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)

    def project_aux(self, aux_hidden: torch.Tensor) -> torch.Tensor:
        """[N, 3*Ht] concatenated target layers -> [N, H]."""
        return self.fc(aux_hidden)

    def forward(
        self,
        input_embeds: torch.Tensor,  # [N, H] target embedding of the next token
        hidden_states: torch.Tensor,  # [N, 3*Ht] target aux states, or [N, H] the draft's own previous output
        positions: torch.Tensor,  # [N]
        attn_fn: AttnFn,
        attn_ctx=None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed hidden for logits [N, H], pre-norm hidden fed to the next draft step [N, H])."""
        if hidden_states.shape[-1] != self.config.hidden_size:
            hidden_states = linear(hidden_states, self.fc.weight, self.fc.bias)
        layer = self.midlayer
        residual = hidden_states
        x = torch.cat([layer.input_layernorm(input_embeds), layer.hidden_norm(hidden_states)], dim=-1)
        x = layer.self_attn(x, positions, self.rotary, attn_fn, attn_ctx)
        residual = residual + x
        x = layer.mlp(layer.post_attention_layernorm(residual))
        prenorm = residual + x
        return self.norm(prenorm), prenorm

    def compute_logits(self, normed: torch.Tensor, target_lm_head: torch.Tensor | None = None) -> torch.Tensor:
        """[N, H] -> [N, draft_vocab] (or the full vocabulary through the target's head)."""
        if self.lm_head is not None:
            return linear(normed, self.lm_head.weight)
        if target_lm_head is None:
            raise ValueError("this draft has no lm_head; pass the target's lm_head weight")
        return linear(normed, target_lm_head)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            return draft_ids
        return draft_ids + self.d2t[draft_ids]
