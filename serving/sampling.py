"""Sampling parameters and the batched sampler (greedy, temperature, top-k, top-p, min-p, per-request seeds)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_N = 16


class InvalidRequest(ValueError):
    """A request field with a bad value; `param` names it (surfaced as HTTP 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(param, msg):
            raise InvalidRequest(f"'{param}' {msg}", param)

        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            bad("top_k", f"must be -1 (off) or >= 1, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            bad("n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be up to 16 non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _seeded_noise(seed: int, step: int, vocab: int, device) -> torch.Tensor:
    """Exponential noise that depends only on (seed, step): reproducible whatever the batch."""
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + step) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.empty(vocab).exponential_(generator=g).to(device)


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[B, V] logits -> [B, V] probabilities after temperature, top-k, top-p, min-p (the distribution sampled)."""
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=logits.device)
    probs = torch.softmax(logits.float() / temps[:, None], dim=-1)
    need_k = any(p.top_k > 0 for p in params)
    need_p = any(p.top_p < 1 for p in params)
    if need_k or need_p:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = torch.ones_like(sorted_p, dtype=torch.bool)
        if need_k:
            ks = torch.tensor([p.top_k if p.top_k > 0 else probs.shape[-1] for p in params], device=logits.device)
            keep &= torch.arange(probs.shape[-1], device=logits.device)[None, :] < ks[:, None]
        if need_p:
            ps = torch.tensor([p.top_p for p in params], device=logits.device)
            before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
            keep &= before < ps[:, None]
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if any(p.min_p > 0 for p in params):
        mins = torch.tensor([p.min_p for p in params], device=logits.device)
        probs = probs * (probs >= mins[:, None] * probs.max(-1, keepdim=True).values)
    return probs / probs.sum(-1, keepdim=True)


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> torch.Tensor:
    """[B, V] -> [B] token ids. `steps[i]` is the output position of row i (for seeded reproducibility)."""
    argmax = logits.argmax(-1)
    if all(p.greedy for p in params):  # decided on the host: no device sync
        return argmax
    greedy = torch.tensor([p.greedy for p in params]).to(logits.device, non_blocking=True)
    probs = processed_probs(logits, params)
    noise = torch.empty_like(probs).exponential_()
    for i, p in enumerate(params):
        if p.seed is not None and not p.greedy:
            noise[i] = _seeded_noise(p.seed, steps[i], probs.shape[-1], probs.device)
    sampled = (probs / noise).argmax(-1)  # exponential race: argmax p_i / E_i ~ Categorical(p)
    return torch.where(greedy, argmax, sampled)
