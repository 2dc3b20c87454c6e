"""Training-time test (TTT): EAGLE-3's unrolled draft training, with SpecForge's alignment, mask and loss.

Alignment, for tokens x_0..x_{T-1} and target logits z_0..z_{T-1} (z_t is the target's distribution of x_{t+1}):

    step 0, position t: draft input (aux_t, embed(x_{t+1})),           target z_{t+1},   mask loss_mask[t]
    step i, position t: (prenorm_{i-1}[t], embed(x_{t+i+1})),         target z_{t+i+1}, mask loss_mask[t+i]

Rotary positions stay t at every step (as SpecForge's current llama3_eagle does). A position counts only where
its target exists (t+i+1 < length), the (shifted) loss mask is set and the target's argmax is in the draft
vocabulary (SpecForge's `position_mask`). SpecForge instead scores the last positions against zero logits; we
drop them.

Attention at step i (`ttt_mask`): position t sees the step-0 keys j <= t (causal, real tokens only) and its own
position's keys from steps 1..i (the draft tokens it would have produced in a chain), nothing else.

Loss: sum_i 0.8^i * ploss_i, ploss_i = -sum_{counted (b, t)} sum_v p_target(v) log q_draft(v) / (B * T),
with p_target the softmax of the target logits restricted to the draft vocabulary (`t2d`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specbundle.modeling import Eagle3DraftModel

LOSS_DECAY = 0.8


class TTTAttention:
    """attn_ctx for `Eagle3DraftModel.forward` over a flattened [B*T] batch: caches every step's K/V.

    fused (default: on CUDA in bf16/fp16) computes each step as flash attention over the step-0 keys (causal), merged
    with the per-position keys of steps 1..i through their log-sum-exp (`_CausalPlusDiagonal`): no [T, T] score
    matrix is kept. Rows of padding positions then differ from the unfused path (they see padded keys), which changes
    nothing that is scored: padding is masked out of the loss and no real position attends to it.
    """

    def __init__(self, batch_size: int, seq_len: int, attention_mask: torch.Tensor, fused: bool | None = None):
        self.batch_size, self.seq_len = batch_size, seq_len
        self.valid = attention_mask.bool()  # [B, T]
        self.fused = fused
        self.causal_mask: torch.Tensor | None = None  # [B, 1, T(q), T(k)], unfused only
        self.keys: list[torch.Tensor] = []  # each [B, Hq, T, D] (unfused) / [B, Hkv, T, D] (fused)
        self.values: list[torch.Tensor] = []
        self.causal_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # fused: step 0's K/V per query head

    def use_fused(self, q: torch.Tensor) -> bool:
        if self.fused is None:
            self.fused = q.device.type == "cuda" and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
        if not self.fused and self.causal_mask is None:
            causal = torch.ones(self.seq_len, self.seq_len, dtype=torch.bool, device=q.device).tril()
            self.causal_mask = (causal[None] & self.valid[:, None, :])[:, None]
        return self.fused


def ttt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: TTTAttention) -> torch.Tensor:
    """q [B*T, Hq, D], k/v [B*T, Hkv, D] of the current step -> [B*T, Hq, D]; appends k/v to ctx's cache."""
    b, t = ctx.batch_size, ctx.seq_len
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    g = hq // hkv
    q = q.view(b, t, hq, d).transpose(1, 2)  # [B, Hq, T, D]
    if ctx.use_fused(q):
        ctx.keys.append(k.view(b, t, hkv, d).transpose(1, 2))
        ctx.values.append(v.view(b, t, hkv, d).transpose(1, 2))
        if ctx.causal_kv is None:
            ctx.causal_kv = tuple(x.repeat_interleave(g, dim=1).contiguous() for x in (ctx.keys[0], ctx.values[0]))
        k0, v0 = ctx.causal_kv
        if len(ctx.keys) > 1:
            kd = torch.stack(ctx.keys[1:], dim=3).repeat_interleave(g, dim=1)  # [B, Hq, T, S, D]
            vd = torch.stack(ctx.values[1:], dim=3).repeat_interleave(g, dim=1)
        else:
            kd = vd = q.new_zeros(b, hq, t, 0, d)
        out = _CausalPlusDiagonal.apply(q.contiguous(), k0, v0, kd, vd, d**-0.5)
        return out.transpose(1, 2).reshape(b * t, hq, d)
    k = k.view(b, t, hkv, d).transpose(1, 2).repeat_interleave(g, dim=1)
    v = v.view(b, t, hkv, d).transpose(1, 2).repeat_interleave(g, dim=1)
    ctx.keys.append(k)
    ctx.values.append(v)
    scale = d**-0.5
    scores = torch.matmul(q, ctx.keys[0].transpose(-1, -2)) * scale  # [B, Hq, T, T]
    scores = scores.masked_fill(~ctx.causal_mask, float("-inf"))
    if len(ctx.keys) > 1:
        diag = torch.stack([(q * ki).sum(-1) for ki in ctx.keys[1:]], dim=-1) * scale  # [B, Hq, T, S]
        diag = diag.masked_fill(~ctx.valid[:, None, :, None], float("-inf"))
        scores = torch.cat([scores, diag], dim=-1)
    probs = scores.float().softmax(-1).to(q.dtype)
    out = torch.matmul(probs[..., :t], ctx.values[0])  # [B, Hq, T, D]
    for s, vs in enumerate(ctx.values[1:]):
        out = out + probs[..., t + s, None] * vs
    return out.transpose(1, 2).reshape(b * t, hq, d)


def _flash_forward(q, k, v, scale):
    """Causal flash attention, q/k/v [B, H, T, D] -> (out, lse [B, H, T] fp32 natural log, what backward needs)."""
    if q.device.type == "cuda":
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False, scale=scale)
        return out, lse, (cq, ck, mq, mk, seed, offset)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, None


def _flash_backward(grad, q, k, v, out, lse, state, scale):
    if state is not None:
        cq, ck, mq, mk, seed, offset = state
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cq, ck, mq, mk, 0.0, True, seed, offset, scale=scale)
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad, q, k, v, out, lse, 0.0, True, scale=scale)


class _CausalPlusDiagonal(torch.autograd.Function):
    """softmax over [causal step-0 keys, S keys at the query's own position] as flash attention plus a merge.

    q/k0/v0 [B, H, T, D], kd/vd [B, H, T, S, D]. With lse_c the causal part's log-sum-exp, d_s = scale q.kd_s and
    lse = logaddexp(lse_c, logsumexp_s d_s): out = a O_c + sum_s p_s vd_s, a = exp(lse_c - lse), p_s = exp(d_s - lse).
    Backward: the causal scores' gradients are a p^c_j (g.v_j - g.out); flash backward given the gradient a g and the
    merged out (its row term is rowsum(grad * out)) computes exactly those, so no [T, T] matrix is ever formed.
    """

    @staticmethod
    def forward(ctx, q, k0, v0, kd, vd, scale):
        with torch.autocast(q.device.type, enabled=False):
            o_c, lse_c, state = _flash_forward(q, k0, v0, scale)
            if kd.shape[3]:
                d = (q.float().unsqueeze(3) * kd.float()).sum(-1) * scale  # [B, H, T, S]
                lse = torch.logaddexp(lse_c, d.logsumexp(-1))
                a, p = torch.exp(lse_c - lse), torch.exp(d - lse[..., None])
                out = (a[..., None] * o_c.float() + (p[..., None] * vd.float()).sum(3)).to(q.dtype)
            else:
                lse, out = lse_c, o_c
        ctx.save_for_backward(q, k0, v0, kd, vd, out, lse_c, lse)
        ctx.state, ctx.scale = state, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k0, v0, kd, vd, out, lse_c, lse = ctx.saved_tensors
        scale = ctx.scale
        with torch.autocast(q.device.type, enabled=False):
            grad = grad.contiguous()
            a = torch.exp(lse_c - lse)
            dq, dk0, dv0 = _flash_backward((grad.float() * a[..., None]).to(q.dtype), q, k0, v0, out.contiguous(),
                                           lse_c, ctx.state, scale)
            dkd = dvd = None
            if kd.shape[3]:
                g = grad.float().unsqueeze(3)  # [B, H, T, 1, D]
                p = torch.exp((q.float().unsqueeze(3) * kd.float()).sum(-1) * scale - lse[..., None])  # [B, H, T, S]
                delta = (grad.float() * out.float()).sum(-1, keepdim=True)  # [B, H, T, 1]
                ds = p * ((g * vd.float()).sum(-1) - delta)
                dq = (dq.float() + (ds[..., None] * kd.float()).sum(3) * scale).to(q.dtype)
                dkd = (ds[..., None] * q.float().unsqueeze(3) * scale).to(kd.dtype)
                dvd = (p[..., None] * g).to(vd.dtype)
        return dq, dk0, dv0, dkd, dvd, None


def ttt_mask(seq_len: int, step: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The explicit TTT mask at `step`: [B, T, T*(step+1)] bool (True = attend); keys are step-major."""
    valid = (torch.ones(1, seq_len, dtype=torch.bool) if attention_mask is None else attention_mask.bool())
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=valid.device).tril()[None] & valid[:, None, :]
    eye = torch.eye(seq_len, dtype=torch.bool, device=valid.device)[None] & valid[:, None, :]
    return torch.cat([causal] + [eye] * step, dim=-1)


def shift_left(x: torch.Tensor, n: int, dim: int = 1) -> torch.Tensor:
    """x[:, n:] padded with zeros back to the same length along `dim`."""
    if n == 0:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = n
    return torch.cat([x.narrow(dim, n, x.shape[dim] - n), x.new_zeros(pad_shape)], dim=dim)


@dataclass
class TTTTargets:
    target_p: torch.Tensor  # [B, T + K, Vd] fp32, row t = softmax of z_{t+1} over the draft vocab; zero-padded
    position_mask: torch.Tensor  # [B, T] bool, step 0's counted positions
    loss_mask: torch.Tensor  # [B, T] bool, step 0's loss mask restricted to positions whose target exists


@torch.no_grad()
def prepare_targets(
    target_logits: torch.Tensor, t2d: torch.Tensor, loss_mask: torch.Tensor, attention_mask: torch.Tensor,
    ttt_length: int,
) -> TTTTargets:
    """target_logits [B, T, V] (unshifted), t2d [V] bool, masks [B, T] -> what every TTT step scores against."""
    b, t, _ = target_logits.shape
    z = target_logits[:, 1:]  # [B, T-1, V]: z_{t+1} for t < T-1
    in_draft = t2d[z.argmax(-1)]  # [B, T-1]
    p = z[..., t2d].float().softmax(-1)  # [B, T-1, Vd]
    target_p = F.pad(p, (0, 0, 0, ttt_length + 1))  # [B, T + K, Vd]
    has_target = shift_left(attention_mask.bool(), 1)  # x_{t+1} is a real token
    lm = loss_mask.bool() & has_target
    return TTTTargets(target_p=target_p, position_mask=lm & F.pad(in_draft, (0, 1)), loss_mask=lm)


class Eagle3TrainModule(nn.Module):
    """The draft plus its TTT unroll in one forward, so FSDP/DeepSpeed wrap a single module (params gathered once).

    forward returns plosses [K] (per step), correct [K] (argmax hits on counted positions) and counted [K]
    (loss-mask positions, the accuracy denominator as SpecForge takes it).
    """

    def __init__(self, draft: Eagle3DraftModel, ttt_length: int = 7, fused_attention: bool | None = None):
        super().__init__()
        if ttt_length < 1:
            raise ValueError(f"ttt_length must be >= 1, got {ttt_length}")
        self.draft = draft
        self.ttt_length = ttt_length
        self.fused_attention = fused_attention  # None: TTTAttention's default for the device and dtype

    def forward(
        self,
        input_embeds: torch.Tensor,  # [B, T, H] target embedding of x_t (unshifted)
        aux_hidden: torch.Tensor,  # [B, T, 3*Ht]
        target_p: torch.Tensor,  # [B, T + K, Vd] from prepare_targets
        position_mask: torch.Tensor,  # [B, T] bool
        loss_mask: torch.Tensor,  # [B, T] bool
        attention_mask: torch.Tensor,  # [B, T]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, h = input_embeds.shape
        dtype = self.draft.fc.weight.dtype
        if not torch.is_floating_point(aux_hidden) or aux_hidden.dtype != dtype:
            aux_hidden = aux_hidden.to(dtype)
        embeds = F.pad(input_embeds[:, 1:].to(dtype), (0, 0, 0, self.ttt_length))  # [B, T-1+K, H]: x_{t+1}, ...
        positions = torch.arange(t, device=input_embeds.device).repeat(b)  # [B*T]
        ctx = TTTAttention(b, t, attention_mask, self.fused_attention)
        hidden = aux_hidden.reshape(b * t, -1)
        plosses, correct, counted = [], [], []
        for i in range(self.ttt_length):
            normed, hidden = self.draft(embeds[:, i:i + t].reshape(b * t, h), hidden, positions, ttt_attention, ctx)
            logits = self.draft.compute_logits(normed).view(b, t, -1).float()  # [B, T, Vd]
            p = target_p[:, i:i + t]
            pm = shift_left(position_mask, i)
            # -sum_v p log softmax(l) = logsumexp(l) - sum_v p l, as p sums to 1 on counted rows: keeps no extra
            # [B, T, Vd] log-prob tensor alive for backward
            ce = torch.logsumexp(logits, -1) - (p * logits).sum(-1)  # [B, T]
            plosses.append((ce * pm).sum() / (b * t))
            with torch.no_grad():
                correct.append(((logits.argmax(-1) == p.argmax(-1)) & pm).sum())
                counted.append(shift_left(loss_mask, i).sum())
        return torch.stack(plosses), torch.stack(correct), torch.stack(counted)


def weighted_loss(plosses: torch.Tensor) -> torch.Tensor:
    """sum_i 0.8^i * ploss_i (SpecForge's ploss weighting)."""
    weights = LOSS_DECAY ** torch.arange(plosses.numel(), device=plosses.device, dtype=plosses.dtype)
    return (weights * plosses).sum()


def accept_length(acc: list[float]) -> float:
    """Expected tokens per target verification when chain-drafting len(acc) tokens.

    acc[k] is the TTT accuracy at step k: how often the draft's top-1 at depth k equals the target's top-1 given
    the true prefix, i.e. an estimate of P(draft token k accepted | tokens 0..k-1 accepted). A chain is accepted
    up to its first miss, so the expected number of accepted draft tokens is sum_k prod_{j<=k} acc[j]; the
    verification always adds the target's own next token, so

        accept_length = 1 + sum_{k=0}^{K-1} prod_{j=0}^{k} acc[j]

    which is what SGLang reports as `accept_length` (tokens per verify step) for greedy chain drafting.
    """
    total, prod = 1.0, 1.0
    for a in acc:
        prod *= a
        total += prod
    return total
